"""The XLA:CPU low-bit matmul kernel (lacax/model/cpu_quant_matmul.cc) against the XLA dequantize-and-dot path."""

import ctypes
import os
import re
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest, parameterized
import gguf
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax import memory
from lacax.cache.kv_cache import KVCache
from lacax.cache.full import FullPolicy
from lacax.compress import packed
from lacax.model import cpu_kernels
from lacax.model import cpu_quant_matmul
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.model.quantized import PackedTable, PackedWeight, SparseWeight
from lacax.sampling import SamplingConfig
from lacax.weights import gguf as gguf_weights

_HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
_EQ = "btk,kn->btn"


def _uses_kernel(fn, *args) -> bool:
  return "lacax_quant_matmul" in jax.jit(fn).lower(*args).as_text()


def _weight(rng, K, N, bits, group, *, affine=False, scale_dtype=jnp.float32) -> PackedWeight:
  """A one-layer PackedWeight [K, N]: lacax's symmetric quantizer, or GGUF-style affine codes with float16
  block scales and mins (Q4_1)."""
  if not affine:
    w = jnp.asarray(rng.normal(size=(1, K, N)), jnp.float32)
    pw = jax.tree.map(lambda a: a[0], PackedWeight.quantize(w, 1, bits, group))
    return pw.replace(scales=pw.scales.astype(scale_dtype))
  g = K if group is None else group
  codes = rng.integers(0, 2 ** bits, size=(K, N)).astype(np.uint8)
  scales = (rng.uniform(0.01, 0.1, size=(K // g, N))).astype(scale_dtype)
  mins = (-rng.uniform(0.0, 0.5, size=(K // g, N))).astype(scale_dtype)
  return PackedWeight.from_codes(codes, jnp.asarray(scales), jnp.asarray(mins), bits=bits, group_size=g,
                                 in_shape=(K,), out_shape=(N,))


class _KernelOn(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    cpu_quant_matmul.set_enabled(True)
    self.assertTrue(cpu_quant_matmul.available(), "a compiler is present, so the kernel must build")


@absltest.skipUnless(_HAS_COMPILER, "no C++ compiler: lacax uses the XLA path")
class KernelParityTest(_KernelOn):

  @parameterized.parameters(
      # K, N, bits, group, M, affine, scale dtype
      (576, 1536, 8, None, 1, False, "float32"),  # SmolLM2 w_gate / w_up, per-channel int8
      (576, 1536, 4, 32, 1, False, "float32"),
      (1536, 576, 4, 32, 3, False, "float32"),  # w_down
      (77, 131, 8, 7, 3, False, "float32"),  # odd K and N: two full tiles + 3 tail columns
      (78, 37, 4, 26, 8, False, "float32"),  # odd N below one tile, group not a power of two
      (64, 200, 3, 16, 8, False, "float32"),  # 3-bit codes stored as 4
      (96, 70, 2, 32, 5, False, "float32"),  # 2-bit, four codes per byte
      (64, 96, 8, 32, 3, False, "float16"),  # GGUF Q8_0 (float16 block scales)
      (64, 96, 4, 32, 1, False, "float16"),  # GGUF Q4_0
      (128, 160, 4, 32, 8, True, "float16"),  # GGUF Q4_1 (affine, float16 scales and mins)
      (64, 80, 4, 16, 3, True, "float32"),
      (64, 64, 4, 32, 16, False, "float32"),  # MAX_ROWS: four blocks of 4 rows
  )
  def test_equals_xla_dequant_reference(self, K, N, bits, group, M, affine, scale_dtype):
    rng = np.random.default_rng(K * N + bits + M)
    pw = _weight(rng, K, N, bits, group, affine=affine, scale_dtype=jnp.dtype(scale_dtype))
    x = jnp.asarray(rng.normal(size=(1, M, K)), jnp.float32)
    self.assertTrue(cpu_quant_matmul.supports(pw, x, _EQ))
    kernel = lambda x, p: p.project(x, _EQ)
    self.assertTrue(_uses_kernel(kernel, x, pw))
    got = jax.jit(kernel)(x, pw)
    want = jnp.einsum(_EQ, x, pw.dense(), precision="highest")
    self.assertEqual(got.shape, (1, M, N))
    self.assertEqual(got.dtype, jnp.float32)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * scale * np.sqrt(K))

  def test_multi_axis_projections_and_bfloat16(self):
    """wq-like (one input axis, two output axes) and wo-like (two input axes) einsums; bfloat16 inputs are
    multiplied in float32 and rounded once (the XLA path rounds the weight to bfloat16 first)."""
    rng = np.random.default_rng(1)
    w_q = jnp.asarray(rng.normal(size=(1, 64, 4, 16)), jnp.float32)
    w_o = jnp.asarray(rng.normal(size=(1, 4, 16, 64)), jnp.float32)
    pq = jax.tree.map(lambda a: a[0], PackedWeight.quantize(w_q, 1, 4, 32))
    po = jax.tree.map(lambda a: a[0], PackedWeight.quantize(w_o, 2, 8, None))
    h = jnp.asarray(rng.normal(size=(2, 1, 64)), jnp.float32)
    heads = jnp.asarray(rng.normal(size=(2, 1, 4, 16)), jnp.float32)
    for x, pw, eq in ((h, pq, "btd,dhk->bthk"), (heads, po, "bthk,hkd->btd")):
      self.assertTrue(_uses_kernel(lambda x, p: p.project(x, eq), x, pw))
      want = jnp.einsum(eq, x, pw.dense(), precision="highest")
      got = jax.jit(lambda x, p: p.project(x, eq))(x, pw)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
      got16 = jax.jit(lambda x, p: p.project(x, eq))(x.astype(jnp.bfloat16), pw)
      self.assertEqual(got16.dtype, jnp.bfloat16)
      exact = jnp.einsum(eq, x.astype(jnp.bfloat16).astype(jnp.float32), pw.dense(), precision="highest")
      np.testing.assert_allclose(np.asarray(got16, np.float32), np.asarray(exact), rtol=1e-2, atol=1e-2)
      self.assertFalse(np.array_equal(np.asarray(got16), np.asarray(got)))  # it really ran in bfloat16

  def test_vmap_and_gradient_go_through_the_reference_where_needed(self):
    rng = np.random.default_rng(2)
    pw = _weight(rng, 64, 96, 4, 32)
    x = jnp.asarray(rng.normal(size=(5, 1, 1, 64)), jnp.float32)
    # vmap over rows of x (the custom call runs once per element) and over a stacked weight (as the
    # PackedWeight tests of test_compress_quant do).
    got = jax.jit(jax.vmap(lambda x: pw.project(x, _EQ)))(x)
    want = jnp.einsum("ebtk,kn->ebtn", x, pw.dense(), precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a[::-1]]), pw)
    got = jax.jit(jax.vmap(lambda p: p.project(x[0], _EQ)))(stacked)
    want = jnp.einsum("btk,lkn->lbtn", x[0], stacked.dense(), precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    # Derivatives come from the XLA path (inference-only kernel): same gradient as without the kernel.
    loss = lambda x, p: jnp.sum(jnp.sin(p.project(x, _EQ)))
    self.assertTrue(_uses_kernel(loss, x[0], pw))
    g_kernel = jax.jit(jax.grad(loss))(x[0], pw)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(pw._xla_project(x, _EQ))))(x[0])  # pylint: disable=protected-access
    np.testing.assert_allclose(np.asarray(g_kernel), np.asarray(g_ref), rtol=1e-4, atol=1e-4)

  def test_portable_build_computes_the_same(self):
    """Built without -march=native (no AVX2 / AVX-512 / F16C paths: the generic vector code of older CPUs),
    the library computes the same products as the native build."""
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    with mock.patch.dict(os.environ, {"LACAX_CACHE_DIR": tmp}):
      library = ctypes.CDLL(str(cpu_kernels.build(cpu_quant_matmul.SOURCE, flag_sets=(["-O3"],))))
    jax.ffi.register_ffi_target("lacax_quant_matmul_portable", jax.ffi.pycapsule(library.LacaxQuantMatmul),
                                platform="cpu")
    rng = np.random.default_rng(6)
    for K, N, bits, group, M, affine, scale_dtype in ((77, 131, 8, 7, 3, False, jnp.float32),
                                                      (128, 160, 4, 32, 5, True, jnp.float16),
                                                      (96, 70, 2, 32, 1, False, jnp.float32)):
      pw = _weight(rng, K, N, bits, group, affine=affine, scale_dtype=scale_dtype)
      x = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
      mins = pw.mins[None] if affine else jnp.zeros((1,), pw.scales.dtype)
      args = (x, pw.data[None], pw.scales[None], mins, jnp.zeros((), jnp.int32))
      attrs = dict(storage_bits=8 if bits == 8 else (4 if bits > 2 else 2), group_size=pw.group_size, affine=affine)
      call = cpu_quant_matmul._call  # pylint: disable=protected-access
      native, portable = call(*args, **attrs), call(*args, **attrs, target="lacax_quant_matmul_portable")
      want = jnp.einsum("mk,kn->mn", x, pw.dense(), precision="highest")
      scale = float(jnp.max(jnp.abs(want)))
      np.testing.assert_allclose(np.asarray(portable), np.asarray(want), rtol=0, atol=2e-6 * scale * np.sqrt(K))
      np.testing.assert_allclose(np.asarray(portable), np.asarray(native), rtol=0, atol=2e-6 * scale * np.sqrt(K))

  def test_unsupported_inputs_keep_the_xla_path(self):
    rng = np.random.default_rng(3)
    pw = _weight(rng, 64, 96, 4, 32)
    prefill = jnp.asarray(rng.normal(size=(1, cpu_quant_matmul.MAX_ROWS + 1, 64)), jnp.float32)
    stacked = jax.tree.map(lambda a: a[None], pw)  # a layer axis: not one layer
    self.assertFalse(cpu_quant_matmul.supports(pw, prefill, _EQ))
    self.assertFalse(cpu_quant_matmul.supports(stacked, prefill[:, :1], _EQ))
    self.assertFalse(cpu_quant_matmul.supports(pw, prefill[:, :1], "btk,kn->bnt"))  # output axes reordered
    self.assertFalse(cpu_quant_matmul.supports(pw, prefill[:, :1].astype(jnp.int32), _EQ))
    self.assertFalse(_uses_kernel(lambda x, p: p.project(x, _EQ), prefill, pw))
    got = jax.jit(lambda x, p: p.project(x, _EQ))(prefill, pw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum(_EQ, prefill, pw.dense())), rtol=1e-5,
                               atol=1e-4)


class FallbackTest(absltest.TestCase):

  def test_without_a_compiler_one_warning_and_the_xla_path(self):
    """The library is built by the one mechanism of lacax.model.cpu_kernels: no compiler (and an empty kernel
    cache) means one warning naming this kernel, and the XLA path computes the same product."""
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    library = cpu_kernels.KernelLibrary(cpu_quant_matmul.SOURCE, cpu_quant_matmul.KERNELS.targets,
                                        cpu_quant_matmul.KERNELS.what)
    rng = np.random.default_rng(4)
    pw = _weight(rng, 64, 96, 4, 32)
    x = jnp.asarray(rng.normal(size=(1, 1, 64)), jnp.float32)
    with mock.patch.dict(os.environ, {"LACAX_CACHE_DIR": tmp}), \
        mock.patch.object(cpu_kernels, "_compiler", return_value=None), \
        mock.patch.object(cpu_quant_matmul, "KERNELS", library), self.assertLogs(level="WARNING") as logs:
      self.assertFalse(cpu_quant_matmul.available())
      self.assertFalse(cpu_quant_matmul.available())  # asked again: no second build, no second warning
      self.assertFalse(_uses_kernel(lambda x, p: p.project(x, _EQ), x, pw))
      got = jax.jit(lambda x, p: p.project(x, _EQ))(x, pw)
    self.assertLen(logs.output, 1)
    self.assertIn("lacax: CPU low-bit matmul kernel unavailable, using the pure-JAX path (no C++ compiler",
                  logs.output[0])
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum(_EQ, x, pw.dense())), rtol=1e-5, atol=1e-4)


def _tiny_model():
  cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2)
  params = llama.init_params(cfg, jax.random.PRNGKey(0))
  return cfg, params


def _greedy(params, cfg, prompts):
  return generation.generate(params, cfg, prompts, max_new_tokens=8, bucket=8).tokens


@absltest.skipUnless(_HAS_COMPILER, "no C++ compiler: lacax uses the XLA path")
class PackedModelTest(_KernelOn):
  """A packed model decodes the same greedy tokens with and without the kernel."""

  def tearDown(self):
    cpu_quant_matmul.set_enabled(True)
    jax.clear_caches()
    super().tearDown()

  def _compare(self, params, cfg, prompts):
    tokens = jnp.asarray([prompts[0][:1]], jnp.int32)
    step = lambda p: llama.forward(p, tokens, jnp.zeros_like(tokens), None, cfg)[0]
    self.assertTrue(_uses_kernel(step, params))
    with_kernel = _greedy(params, cfg, prompts)
    logits_kernel = jax.jit(step)(params)
    cpu_quant_matmul.set_enabled(False)
    jax.clear_caches()
    self.assertFalse(_uses_kernel(step, params))
    without = _greedy(params, cfg, prompts)
    logits_xla = jax.jit(step)(params)
    self.assertEqual(with_kernel, without)
    self.assertGreater(len(set(with_kernel[0])), 1)  # not a degenerate repetition
    np.testing.assert_allclose(np.asarray(logits_kernel), np.asarray(logits_xla), rtol=1e-4, atol=1e-4)

  def test_compressed_model_int8_and_int4_segments(self):
    cfg, params = _tiny_model()
    layers = packed.compress_layers(params["layers"], [8, 4], [None] * 2, storage="packed", group_size=32)
    params = {**params, "layers": layers}
    self._compare(params, cfg, [[5, 17, 3, 44, 9], [2, 7]])

  def test_scan_reads_packed_layers_in_place(self):
    """The decoder's scan passes packed weights whole (`PackedWeight.at_layer`): no layer's codes are copied
    out of the stack before the kernel reads them, and each layer's product is that layer's."""
    cfg, params = _tiny_model()
    layers = packed.compress_layers(params["layers"], [4, 4], [None] * 2, storage="packed", group_size=32)
    params = {**params, "layers": layers}
    tokens = jnp.asarray([[3]], jnp.int32)
    step = jax.jit(lambda p: llama.forward(p, tokens, jnp.zeros_like(tokens), None, cfg)[0])
    hlo = step.lower(params).compile().as_text()
    self.assertIn("lacax_quant_matmul", hlo)
    self.assertIsNone(re.search(r"= [us]8\[[^\]]*\]\S* dynamic-slice\(", hlo), "a packed layer is sliced (copied)")
    stacked = layers[0]["w_up"]
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 1, cfg.hidden_size)), jnp.float32)
    for layer in range(2):
      got = jax.jit(lambda x, w, i: w.at_layer(i).project(x, "btd,df->btf"))(x, stacked, layer)
      want = jnp.einsum("btd,df->btf", x, stacked.dense()[layer], precision="highest")
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

  def test_gguf_q4_1_kept_quantized(self):
    from tests import test_gguf  # pylint: disable=g-import-not-at-top

    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    path = os.path.join(tmp, "model.gguf")
    hf = test_gguf._hf_weights(np.random.default_rng(0), tied=True, bias=False)  # pylint: disable=protected-access
    test_gguf._write_gguf(path, hf, qtype=gguf.GGMLQuantizationType.Q4_1)  # pylint: disable=protected-access
    cfg, kept = gguf_weights.read_gguf(path, keep_quantized=True)
    self.assertIsNotNone(kept["layers"]["w_up"].mins)
    self._compare(jax.tree.map(jnp.asarray, kept), cfg, [[1, 4, 2, 8], [3]])


@absltest.skipUnless(_HAS_COMPILER, "no C++ compiler: lacax uses the XLA path")
class StreamingKernelTest(_KernelOn):
  """Dense weights streamed in place (`project_dense_group`) and output-major tables (`project_rows`)."""

  def tearDown(self):
    cpu_quant_matmul.set_enabled(True)
    jax.clear_caches()
    super().tearDown()

  @parameterized.parameters(
      # dtype, K, N, M, layers
      (jnp.float32, 64, 128, 1, 3), (jnp.float32, 577, 70, 5, 2), (jnp.bfloat16, 96, 48, 16, 2),
      (jnp.bfloat16, 13, 17, 2, 1), (jnp.float16, 72, 40, 3, 2))
  def test_dense_equals_einsum(self, dtype, K, N, M, layers):
    rng = np.random.default_rng(K + N)
    data = jnp.asarray(rng.normal(size=(layers, K, N)), jnp.float32).astype(dtype)
    x = jnp.asarray(rng.normal(size=(1, M, K)), jnp.float32)
    for layer in range(layers):
      w = llama.StreamedWeight(data).at_layer(layer)
      fn = lambda x, w: w.project(x, "btk,kn->btn", preferred_element_type=jnp.float32)  # noqa: E731
      self.assertIn("lacax_dense_matmul", jax.jit(fn).lower(x, w).as_text())
      got = jax.jit(fn)(x, w)
      want = jnp.einsum("btk,kn->btn", x, data[layer].astype(jnp.float32), precision="highest")
      # float32 summation order: the error of a sum of K unit-variance products grows as sqrt(K).
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.sqrt(K / 64))

  @parameterized.parameters((64, 96, 1), (576, 70, 3), (40, 32, 16), (24, 33, 2))
  def test_bf16_products_of_bf16_inputs(self, K, N, M):
    """A bfloat16 weight times x whose values are bfloat16 (a bfloat16 model's activations) takes the
    AVX512-BF16 dot-product path where the CPU has it (row pairs interleaved, lanes put back in order, the last
    N % 32 columns widened); x with other values takes the widening path. Both equal the float32 product."""
    rng = np.random.default_rng(K * N + M)
    data = jnp.asarray(rng.normal(size=(3, K, N)), jnp.bfloat16)
    table = jnp.asarray(rng.normal(size=(N, K)), jnp.bfloat16)
    exact = jnp.asarray(rng.normal(size=(1, M, K)), jnp.bfloat16).astype(jnp.float32)
    for x in (exact, exact + 1e-3):
      for layer in (0, 2):
        w = llama.StreamedWeight(data).at_layer(layer)
        got = jax.jit(lambda x, w: w.project(x, "btk,kn->btn", preferred_element_type=jnp.float32))(x, w)
        want = jnp.einsum("btk,kn->btn", x, data[layer].astype(jnp.float32), precision="highest")
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * scale * np.sqrt(K))
      ref = lambda x, t, s, m: jnp.einsum("btd,vd->btv", x, t.astype(jnp.float32))  # noqa: E731
      got = jax.jit(lambda x, t: cpu_quant_matmul.project_rows(x, t, None, None, ref))(x, table)
      want = jnp.einsum("btd,vd->btv", x, table.astype(jnp.float32), precision="highest")
      scale = float(jnp.max(jnp.abs(want)))
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * scale * np.sqrt(K))

  @parameterized.parameters((576, 192, 1), (40, 33, 3), (13, 17, 2))
  def test_bf16_operand_and_result_cross_the_call_as_they_are(self, K, N, M):
    """A bfloat16 x goes into the kernel and a bfloat16 result comes out of it without an XLA convert on
    either side: the float32 sum rounded once to nearest even (1 bfloat16 ulp of the float32 reference's
    rounding, for the summation order), the same dtype as the einsum's."""
    rng = np.random.default_rng(K + N + M)
    data = jnp.asarray(rng.normal(size=(2, K, N)), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(1, M, K)), jnp.bfloat16)
    w = llama.StreamedWeight(data).at_layer(1)
    fn = jax.jit(lambda x, w: w.project(x, "btk,kn->btn"))
    hlo = fn.lower(x, w).compile().as_text()
    call = [line for line in hlo.splitlines() if "lacax_dense_matmul" in line and "custom-call(" in line]
    self.assertLen(call, 1)
    self.assertRegex(call[0], r"= bf16\[%d,%d\]" % (M, N))  # the result, and x (below), are bfloat16
    self.assertIn("operand_layout_constraints={bf16[%d,%d]" % (M, K), call[0])
    got = fn(x, w)
    self.assertEqual(got.dtype, jnp.bfloat16)
    want = jnp.einsum("btk,kn->btn", x.astype(jnp.float32), data[1].astype(jnp.float32), precision="highest")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32),
                               rtol=2.0**-7, atol=1e-6)

  @parameterized.parameters((jnp.float32, jnp.float32, 64), (jnp.bfloat16, jnp.bfloat16, 96),
                            (jnp.bfloat16, jnp.float32, 40), (jnp.float16, jnp.float32, 13))
  def test_projections_of_one_input_share_a_call(self, dtype, x_dtype, K):
    """`project_group` computes a layer's q / k / v (three weights, widths with and without a tail of N % 32
    columns) in one kernel call, with the values of one call each, and their derivatives through the
    reference; weights of two dtypes are not grouped."""
    rng = np.random.default_rng(K)
    stacks = [jnp.asarray(rng.normal(size=(2, K, h, 8)), jnp.float32).astype(dtype) for h in (6, 2, 3)]
    x = jnp.asarray(rng.normal(size=(1, 2, K)), jnp.float32).astype(x_dtype)
    eq = "btd,dhk->bthk"
    def group(x, ds):
      layer = jnp.asarray(1, jnp.int32)  # one index: the decoder's scan gives every weight of a layer its step
      return llama.project_group(x, [llama.StreamedWeight(d).at_layer(layer) for d in ds], eq)

    hlo = jax.jit(group).lower(x, stacks).compile().as_text()
    calls = [line for line in hlo.splitlines() if "lacax_dense_matmul" in line and "custom-call(" in line]
    self.assertLen(calls, 1)
    got = jax.jit(group)(x, stacks)
    for d, g in zip(stacks, got):
      one = jax.jit(lambda x, d: llama.StreamedWeight(d).at_layer(1).project(x, eq))(x, d)
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(one, np.float32))
      want = jnp.einsum(eq, x.astype(jnp.float32), d[1].astype(jnp.float32), precision="highest")
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2 * np.sqrt(K))
    loss = lambda x, ds: sum(jnp.sum(y.astype(jnp.float32) ** 2) for y in group(x, ds))  # noqa: E731
    ref = lambda x, ds: sum(jnp.sum(jnp.einsum(eq, x, d[1]).astype(jnp.float32) ** 2) for d in ds)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(x, stacks), np.float32),
                               np.asarray(jax.grad(ref)(x, stacks), np.float32), rtol=1e-2, atol=1e-2)
    mixed = [stacks[0], stacks[1].astype(jnp.float32 if dtype != jnp.float32 else jnp.bfloat16)]
    hlo = jax.jit(group).lower(x, mixed).compile().as_text()
    self.assertLen([line for line in hlo.splitlines() if "lacax_dense_matmul" in line and "custom-call(" in line], 2)

  def test_dense_multi_axis_gradient_and_vmap(self):
    rng = np.random.default_rng(1)
    data = jnp.asarray(rng.normal(size=(2, 4, 8, 24)), jnp.float32)  # [L, heads, head_dim, out] like wo
    x = jnp.asarray(rng.normal(size=(2, 1, 4, 8)), jnp.float32)
    eq = "bthk,hkd->btd"
    w = llama.StreamedWeight(data).at_layer(1)
    want = jnp.einsum(eq, x, data[1], precision="highest")
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: w.project(x, eq))(x)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    loss = lambda d, x: jnp.sum(llama.StreamedWeight(d).at_layer(1).project(x, eq) ** 2)  # noqa: E731
    ref = lambda d, x: jnp.sum(jnp.einsum(eq, x, d[1]) ** 2)  # noqa: E731
    for got, exp in zip(jax.grad(loss, (0, 1))(data, x), jax.grad(ref, (0, 1))(data, x)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-4, atol=1e-4)
    per_row = jax.vmap(lambda xi: w.project(xi[None], eq)[0])(x)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(want), rtol=1e-5, atol=1e-5)

  @parameterized.parameters(jnp.float32, jnp.bfloat16, jnp.float16)
  def test_rows_dense_table(self, dtype):
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(300, 80)), jnp.float32).astype(dtype)
    for M in (1, 4, 16):
      x = jnp.asarray(rng.normal(size=(1, M, 80)), jnp.float32)
      self.assertTrue(cpu_quant_matmul.supports_rows(table.shape, x, "btd,vd->btv", dtype=dtype))
      ref = lambda x, t, s, m: jnp.einsum("btd,vd->btv", x, t.astype(jnp.float32))  # noqa: E731
      got = jax.jit(lambda x, t: cpu_quant_matmul.project_rows(x, t, None, None, ref))(x, table)
      want = jnp.einsum("btd,vd->btv", x, table.astype(jnp.float32), precision="highest")
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

  @parameterized.parameters((8, 32), (8, 192), (4, 32), (4, 64), (3, 32))
  def test_packed_table_product_and_lookup(self, bits, group):
    rng = np.random.default_rng(bits * group)
    dense = jnp.asarray(rng.normal(size=(130, 192)), jnp.float32)
    table = PackedTable.quantize(dense, bits, group)
    self.assertEqual(table.shape, (130, 192))
    bound = float(jnp.max(jnp.abs(dense))) / (2 ** (bits - 1) - 1)
    self.assertLessEqual(float(jnp.max(jnp.abs(table.dense() - dense))), bound)
    for M in (1, 3, 16):
      x = jnp.asarray(rng.normal(size=(1, M, 192)), jnp.float32)
      fn = lambda x, t: t.project(x, "btd,vd->btv", preferred_element_type=jnp.float32)  # noqa: E731
      self.assertIn("lacax_rows_matmul", jax.jit(fn).lower(x, table).as_text())
      want = jnp.einsum("btd,vd->btv", x, table.dense(), precision="highest")
      np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, table)), np.asarray(want), rtol=1e-5, atol=1e-5)
    ids = jnp.asarray([[0, 129, 7]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(table.lookup(ids, jnp.float32)), np.asarray(table.dense()[ids]))

  def test_affine_table_in_gguf_block_order(self):
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, size=(40, 64)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(40, 2)).astype(np.float16)
    mins = (-rng.uniform(0, 0.5, size=(40, 2))).astype(np.float16)
    table = PackedTable.from_codes(codes, jnp.asarray(scales), jnp.asarray(mins), bits=4, group_size=32)
    # Byte j of a 32-code block holds code j (low nibble) and code j + 16 (high nibble), as in GGUF.
    self.assertEqual(int(table.data[0, 0]), int(codes[0, 0]) | (int(codes[0, 16]) << 4))
    want_dense = (codes.reshape(40, 2, 32).astype(np.float32) * scales.astype(np.float32)[..., None]
                  + mins.astype(np.float32)[..., None]).reshape(40, 64)
    np.testing.assert_array_equal(np.asarray(table.dense()), want_dense)
    x = jnp.asarray(rng.normal(size=(2, 2, 64)), jnp.float32)
    got = jax.jit(lambda x, t: t.project(x, "btd,vd->btv"))(x, table)
    np.testing.assert_allclose(np.asarray(got), np.einsum("btd,vd->btv", np.asarray(x), want_dense),
                               rtol=1e-5, atol=1e-5)

  def _decode_step(self, params, cfg):
    from lacax.cache import kv_cache  # pylint: disable=g-import-not-at-top

    cache = kv_cache.init_cache(cfg, 1, 16)
    tokens = jnp.asarray([[3]], jnp.int32)
    return jax.jit(lambda p, c: llama.forward(p, tokens, jnp.zeros_like(tokens), c, cfg)), cache

  @parameterized.parameters("float32", "bfloat16")
  def test_decode_streams_dense_weights_in_place(self, dtype):
    cfg, params = _tiny_model()
    cfg = cfg.replace(dtype=dtype)
    params = jax.tree.map(lambda a: a.astype(cfg.jnp_dtype), params)
    step, cache = self._decode_step(params, cfg)
    hlo = step.lower(params, cache).compile().as_text()
    # One call for q / k / v, one for gate / up, one each for o and down.
    self.assertLen([line for line in hlo.splitlines() if "lacax_dense_matmul" in line and "custom-call(" in line], 4)
    self.assertIn("lacax_rows_matmul", hlo)  # the tied head
    self.assertIsNone(re.search(r"= (f32|bf16)\[\d+,64,\d+\]\S* dynamic-slice\(", hlo),
                      "a layer's weight is sliced (copied) before the kernel reads it")
    # Training and scoring (no cache) keep XLA's dot.
    tokens = jnp.asarray([[3, 4]], jnp.int32)
    uncached = lambda p: llama.forward(p, tokens, jnp.zeros_like(tokens), None, cfg)[0]  # noqa: E731
    self.assertNotIn("lacax_dense_matmul", jax.jit(uncached).lower(params).as_text())
    prompts = [[5, 17, 3, 44, 9], [2, 7]]
    with_kernel = _greedy(params, cfg, prompts)
    logits_kernel = step(params, cache)[0]
    cpu_quant_matmul.set_enabled(False)
    jax.clear_caches()
    step, cache = self._decode_step(params, cfg)
    self.assertNotIn("lacax_dense_matmul", step.lower(params, cache).as_text())
    self.assertEqual(with_kernel, _greedy(params, cfg, prompts))
    # float32: summation order only; bfloat16: the kernel multiplies in float32 and rounds once per product,
    # XLA's bfloat16 dot rounds its result too, so the two differ by about one bfloat16 ulp of the logits.
    tol = 1e-4 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(np.asarray(logits_kernel, np.float32), np.asarray(step(params, cache)[0], np.float32),
                               rtol=tol, atol=tol)

  @parameterized.parameters(True, False)
  def test_packed_head_model(self, tied):
    cfg, params = _tiny_model()
    if tied:  # SmolLM2's form: one table, gathered and multiplied
      cfg = cfg.replace(tie_word_embeddings=True)
      params = {k: v for k, v in params.items() if k != "lm_head"}
    name = "embed" if tied else "lm_head"
    layers = packed.compress_layers(params["layers"], [4, 4], [None] * 2, storage="packed", group_size=32)
    dense_head = params[name]
    params = packed.compress_head({**params, "layers": layers}, tied, 4, group_size=32)
    self.assertIsInstance(params[name], PackedTable)
    self.assertLess(params[name].nbytes, dense_head.nbytes / 3)
    with self.assertRaisesRegex(ValueError, "already a PackedTable"):
      packed.compress_head(params, tied, 4)
    step, cache = self._decode_step(params, cfg)
    self.assertIn("lacax_rows_matmul", step.lower(params, cache).as_text())
    reference = {**params, name: params[name].dense()}  # the same values, dense
    prompts = [[5, 17, 3, 44, 9], [2, 7]]
    self.assertEqual(_greedy(params, cfg, prompts), _greedy(reference, cfg, prompts))
    np.testing.assert_allclose(np.asarray(step(params, cache)[0]), np.asarray(step(reference, cache)[0]),
                               rtol=1e-4, atol=1e-4)


def _sparse_packed(rng, L, K, N, sparsity, group):
  w = rng.normal(size=(L, K, N)) * (rng.uniform(size=(L, K, N)) >= sparsity)
  return PackedWeight.quantize(jnp.asarray(w, jnp.float32), 1, 8, group)


@absltest.skipUnless(_HAS_COMPILER, "no C++ compiler: lacax uses the XLA path")
class SparseWeightTest(_KernelOn):
  """Sparse 8-bit storage: the same values as the packed codes, fewer bytes, and the kernel's product."""

  @parameterized.parameters((0.5, None, 1), (0.7, 32, 3), (0.0, 64, 16), (0.95, None, 2))
  def test_same_values_fewer_bytes_and_kernel_product(self, sparsity, group, M):
    rng = np.random.default_rng(int(sparsity * 100) + M)
    pw = _sparse_packed(rng, 3, 128, 192, sparsity, group)
    sw = SparseWeight.from_packed(pw)
    np.testing.assert_array_equal(np.asarray(sw.dense()), np.asarray(pw.dense()))
    # Bytes: the kept codes, one mask bit per weight, the scales, the offsets and one segment of padding.
    kept = int(np.sum(np.asarray(pw.data) != 0))
    self.assertEqual(sw.nbytes, kept + 3 * 128 * 192 // 8 + pw.scales.nbytes + 4 * 3 * (192 // 64 + 1)
                     + sw.max_segment)
    if sparsity >= 0.5:
      self.assertLess(sw.nbytes, pw.nbytes)
    x = jnp.asarray(rng.normal(size=(1, M, 128)), jnp.float32)
    for layer in range(3):
      one = sw.at_layer(layer)
      fn = lambda x, w: w.project(x, "btk,kn->btn")  # noqa: E731
      self.assertIn("lacax_sparse_matmul", jax.jit(fn).lower(x, one).as_text())
      want = jnp.einsum("btk,kn->btn", x, pw.dense()[layer], precision="highest")
      np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, one)), np.asarray(want), rtol=1e-5, atol=1e-4)
    # The XLA path (kernel off) scatters the same codes back.
    cpu_quant_matmul.set_enabled(False)
    self.addCleanup(cpu_quant_matmul.set_enabled, True)
    got = jax.jit(lambda x, w: w.project(x, "btk,kn->btn"))(x, sw.at_layer(2))
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum("btk,kn->btn", x, pw.dense()[2])),
                               rtol=1e-5, atol=1e-4)

  def test_refuses_what_it_cannot_hold(self):
    rng = np.random.default_rng(0)
    with self.assertRaisesRegex(ValueError, "multiple of 64"):
      SparseWeight.from_packed(_sparse_packed(rng, 1, 64, 96, 0.5, None))
    four = PackedWeight.quantize(jnp.asarray(rng.normal(size=(1, 64, 64)), jnp.float32), 1, 4, 32)
    with self.assertRaisesRegex(ValueError, "8-bit"):
      SparseWeight.from_packed(four)

  def test_corrupt_offsets_are_an_error_not_a_read_out_of_bounds(self):
    sw = SparseWeight.from_packed(_sparse_packed(np.random.default_rng(1), 1, 64, 64, 0.5, None))
    bad = sw.replace(offsets=sw.offsets.at[0, 1].set(3))  # fewer codes than the masks keep
    x = jnp.ones((1, 1, 64), jnp.float32)
    with self.assertRaisesRegex(Exception, "more codes than its segment"):
      jax.block_until_ready(jax.jit(lambda x, w: w.project(x, "btk,kn->btn"))(x, bad.at_layer(0)))

  def test_sparse_model_decodes_like_packed(self):
    cfg, params = _tiny_model()
    pruned = jax.tree.map(lambda a: a, params)
    rng = np.random.default_rng(2)
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
      w = np.asarray(params["layers"][name])
      pruned["layers"][name] = jnp.asarray(w * (rng.uniform(size=w.shape) >= 0.6), jnp.float32)
    as_packed = packed.compress_layers(pruned["layers"], [8, 8], [None] * 2, storage="packed")
    as_sparse = packed.compress_layers(pruned["layers"], [8, 8], [None] * 2, storage="sparse")
    kinds = {name: type(w).__name__ for name, w in as_sparse[0].items() if name in packed.calibrate.PROJECTIONS}
    self.assertEqual(kinds["w_up"], "SparseWeight")
    self.assertLess(packed.layer_param_bytes({"layers": as_sparse}), 0.8 * packed.layer_param_bytes(
        {"layers": as_packed}))
    prompts = [[5, 17, 3, 44, 9], [2, 7]]
    a = _greedy({**params, "layers": as_packed}, cfg, prompts)
    self.assertEqual(a, _greedy({**params, "layers": as_sparse}, cfg, prompts))


def _anon_huge_bytes_in(begin: int, end: int) -> int:
  """AnonHugePages of this process's mappings that overlap [begin, end) (/proc/self/smaps; madvise splits a
  mapping where its flags change, so a buffer can span several)."""
  total, inside = 0, False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and ":" not in head:  # a mapping's header: start-end perms ...
        start, stop = (int(a, 16) for a in head.split("-"))
        inside = start < end and begin < stop
      elif inside and line.startswith("AnonHugePages:"):
        total += int(line.split()[1]) * 1024
  return total


class HugePagesTest(absltest.TestCase):
  """`lacax.memory.back_with_huge_pages`: the weights a decode step streams, on 2 MiB pages where Linux allows."""

  def test_values_unchanged_and_only_large_arrays(self):
    rng = np.random.default_rng(0)
    big = jnp.asarray(rng.normal(size=(3, 1024, 1024)), jnp.float32)  # 12 MiB
    small = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
    want_big, want_small = np.asarray(big).copy(), np.asarray(small).copy()
    done = memory.back_with_huge_pages({"big": big, "small": small, "none": None})
    self.assertEqual(done % (2 << 20), 0)
    self.assertLessEqual(done, big.nbytes)
    np.testing.assert_array_equal(np.asarray(big), want_big)
    np.testing.assert_array_equal(np.asarray(small), want_small)
    np.testing.assert_array_equal(np.asarray(big * 2), want_big * 2)  # still an ordinary XLA buffer
    if done:  # the host allowed it (Linux 6.1+, huge pages not "never", memory for them): they are huge now
      start = big.unsafe_buffer_pointer()
      self.assertGreaterEqual(_anon_huge_bytes_in(start, start + big.nbytes), done)
    self.assertEqual(memory.back_with_huge_pages({"small": small}), 0)

  def test_generate_backs_the_decode_cache_which_decode_updates_in_place(self):
    cfg, params = _tiny_model()
    seen = []
    real = memory.back_with_huge_pages

    def spy(tree, **kwargs):
      seen.append(tree)
      return real(tree, **kwargs)

    with mock.patch.object(memory, "back_with_huge_pages", spy):
      generation.generate(params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=6, bucket=8)
    self.assertLen(seen, 1)
    self.assertIsInstance(seen[0], KVCache)
    # The pages are worth collapsing only if decode keeps the buffers: its donated state's cache is updated in
    # place, every leaf at the address it had.
    tokens, lengths = generation.pad_prompts([[1, 2, 3]], bucket=8)
    statics = dict(cfg=cfg, policy=FullPolicy(), sampling=SamplingConfig(), max_new_tokens=4, stop_ids=())
    state = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                               decode_capacity=16, **statics)
    before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.cache)]
    state = generation.decode(params, state, **statics)
    self.assertEqual([x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.cache)], before)

  def test_turned_off_by_the_environment(self):
    big = jnp.zeros((5 << 20,), jnp.uint8)
    with mock.patch.dict(os.environ, {"LACAX_HUGEPAGES": "0"}):
      self.assertEqual(memory.back_with_huge_pages(big), 0)


if __name__ == "__main__":
  absltest.main()
