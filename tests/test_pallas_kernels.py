"""Parity tests for pallas_kernels: both kernel formulations against the jax.numpy references, on CPU.

The GPU (Triton) formulation runs with `interpret=True`, the TPU (Mosaic) formulation in TPU interpret mode
(`pltpu.InterpretParams`, which simulates DMAs, semaphores and SMEM). Shapes are small but deliberately odd
(head_dim 80, kv_heads 3/5, out_slots not a multiple of the block, more output slots than input slots) so
that every masking and edge-block path runs. The references are themselves checked against numpy loops.
A lowering test checks that both formulations lower to Triton IR / Mosaic MLIR for a Llama-3-8B cache.
"""

import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax import export
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compaction
from pallas_kernels import merge

F32, BF16 = jnp.float32, jnp.bfloat16


def _cache(seed, shape, dtype):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _plan(seed, shape, slots):
  """Random source slots in [-1, slots): about 1 in (slots + 1) entries is an empty (-1) hole."""
  return jnp.asarray(np.random.default_rng(seed).integers(-1, slots, shape), jnp.int32)


def _plan_shape(kind, num_layers, batch, out_slots, kv_heads):
  return {
      "per_head": (num_layers, batch, out_slots, kv_heads),
      "shared": (num_layers, batch, out_slots),
      "broadcast": (1, batch, out_slots, 1),
  }[kind]


def _runs(seed, shape, slots, max_run):
  """Random runs: start in [0, slots), run_len in [0, max_run] clipped so that start + run_len <= slots."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, slots, shape)
  run_len = np.minimum(rng.integers(0, max_run + 1, shape), slots - start)
  return jnp.asarray(start, jnp.int32), jnp.asarray(run_len, jnp.int32)


def _weights(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(0.1, 1.0, shape), jnp.float32)


def _numpy_gather(x, src_index):
  x = np.asarray(x)
  num_layers, batch, slots, kv_heads, _ = x.shape
  idx = np.asarray(src_index)
  if idx.ndim == 3:
    idx = idx[..., None]
  idx = np.broadcast_to(idx, (num_layers, batch, idx.shape[2], kv_heads))
  out = np.zeros(idx.shape + x.shape[-1:], x.dtype)
  for l, b, o, h in np.ndindex(*idx.shape):
    if idx[l, b, o, h] >= 0:
      out[l, b, o, h] = x[l, b, min(idx[l, b, o, h], slots - 1), h]
  return out


def _numpy_merge(x, start, run_len, weight, max_run):
  x = np.asarray(x).astype(np.float64)
  num_layers, batch, _, kv_heads, head_dim = x.shape
  start, run_len, weight = (np.asarray(a) for a in (start, run_len, weight))
  if start.ndim == 3:
    start, run_len = start[..., None], run_len[..., None]
  shape = (num_layers, batch, start.shape[2], kv_heads)
  start, run_len = np.broadcast_to(start, shape), np.broadcast_to(run_len, shape)
  out = np.zeros(shape + (head_dim,))
  for l, b, o, h in np.ndindex(*shape):
    for m in range(min(run_len[l, b, o, h], max_run)):
      s = start[l, b, o, h] + m
      out[l, b, o, h] += weight[l, b, s, h] * x[l, b, s, h]
  return out


def _assert_bitwise_equal(test, actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  test.assertEqual(actual.dtype, expected.dtype)
  test.assertEqual(actual.shape, expected.shape)
  uint = {2: np.uint16, 4: np.uint32}[actual.dtype.itemsize]
  np.testing.assert_array_equal(actual.view(uint), expected.view(uint))


def _assert_close(test, actual, expected, dtype):
  test.assertEqual(np.asarray(actual).dtype, np.dtype(dtype))
  tol = 1e-5 if dtype == F32 else 1e-2  # bf16 output: one rounding of a float32 sum
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol=tol,
                             atol=tol)


# ----------------------------------------------------------------------------------------------------------
# References against numpy loops.
# ----------------------------------------------------------------------------------------------------------


class ReferenceTest(parameterized.TestCase):

  @parameterized.parameters("per_head", "shared", "broadcast")
  def test_gather_matches_numpy(self, kind):
    x = _cache(0, (2, 3, 11, 4, 16), F32)
    src = _plan(1, _plan_shape(kind, 2, 3, 9, 4), 11)
    _assert_bitwise_equal(self, compaction.reference_gather(x, src), _numpy_gather(x, src))

  def test_gather_clamps_out_of_range_indices(self):
    x = _cache(0, (1, 1, 5, 2, 8), F32)
    src = jnp.array([[[[7, 4], [-3, 0]]]], jnp.int32)  # 7 >= S -> slot 4; -3 -> empty
    out = compaction.reference_gather(x, src)
    np.testing.assert_array_equal(out[0, 0, 0, 0], x[0, 0, 4, 0])
    np.testing.assert_array_equal(out[0, 0, 0, 1], x[0, 0, 4, 1])
    np.testing.assert_array_equal(out[0, 0, 1, 0], np.zeros(8, np.float32))
    np.testing.assert_array_equal(out[0, 0, 1, 1], x[0, 0, 0, 1])

  @parameterized.parameters("per_head", "shared")
  def test_merge_matches_numpy(self, kind):
    x = _cache(0, (2, 2, 13, 3, 16), F32)
    start, run_len = _runs(1, _plan_shape(kind, 2, 2, 6, 3), 13, max_run=3)
    weight = _weights(2, (2, 2, 13, 3))
    out = merge.reference_segment_merge(x, start, run_len, weight, max_run=3)
    np.testing.assert_allclose(out, _numpy_merge(x, start, run_len, weight, 3), rtol=1e-6, atol=1e-6)

  def test_merge_of_unit_runs_is_a_gather(self):
    x = _cache(0, (2, 1, 10, 3, 16), BF16)
    src = _plan(1, (2, 1, 7, 3), 10)
    start, run_len = jnp.maximum(src, 0), (src >= 0).astype(jnp.int32)
    out = merge.reference_segment_merge(x, start, run_len, jnp.ones((2, 1, 10, 3)), max_run=2)
    _assert_bitwise_equal(self, out, compaction.reference_gather(x, src))


# ----------------------------------------------------------------------------------------------------------
# Kernel formulations in interpret mode.
# ----------------------------------------------------------------------------------------------------------

# (name, layers, batch, slots, kv_heads, head_dim, out_slots, dtype, plan kind, block_slots)
_GATHER_CASES = (
    ("per_head_bf16_d80_kv3", 2, 3, 13, 3, 80, 7, BF16, "per_head", 2),
    ("per_head_f32_d64_kv8", 2, 1, 17, 8, 64, 5, F32, "per_head", 2),
    ("per_head_f32_kv5_partial_block", 1, 1, 21, 5, 64, 13, F32, "per_head", 3),
    ("shared_bf16_d128_more_out_than_in", 1, 2, 9, 2, 128, 11, BF16, "shared", 4),
    ("shared_f32_kv1", 3, 1, 10, 1, 64, 6, F32, "shared", 4),
    ("broadcast_bf16_d80", 2, 2, 12, 4, 80, 9, BF16, "broadcast", 2),
)

_TPU_GATHER_CASES = (
    ("per_head_bf16_d80_kv3", 1, 2, 13, 3, 80, 7, BF16, "per_head", 3),
    ("per_head_f32_d64_kv8", 1, 1, 17, 8, 64, 5, F32, "per_head", 4),
    ("shared_bf16_d128", 1, 2, 9, 2, 128, 11, BF16, "shared", 4),
    ("broadcast_f32_d80_kv1", 2, 1, 12, 1, 80, 9, F32, "broadcast", 8),
)

# (name, layers, batch, slots, kv_heads, head_dim, out_slots, dtype, shared runs, max_run, block_slots)
_MERGE_CASES = (
    ("per_head_bf16_d80_kv3", 2, 2, 13, 3, 80, 7, BF16, False, 3, 2),
    ("per_head_f32_d64_kv8", 1, 1, 17, 8, 64, 5, F32, False, 4, 2),
    ("shared_f32_d80_kv5", 1, 2, 16, 5, 80, 9, F32, True, 2, 3),
    ("shared_bf16_kv1", 2, 1, 9, 1, 64, 6, BF16, True, 5, 4),
)

_TPU_MERGE_CASES = (
    ("per_head_bf16_d80_kv3", 1, 1, 13, 3, 80, 5, BF16, False, 3, 4),
    ("shared_f32_d64_kv2", 1, 1, 16, 2, 64, 7, F32, True, 2, 4),
)


class GatherKernelTest(parameterized.TestCase):

  def _check(self, backend, interpret, layers, batch, slots, kv_heads, head_dim, out_slots, dtype, kind,
             block_slots):
    x = _cache(0, (layers, batch, slots, kv_heads, head_dim), dtype)
    src = _plan(1, _plan_shape(kind, layers, batch, out_slots, kv_heads), slots)
    kernel = jax.jit(functools.partial(compaction.pallas_gather, backend=backend, interpret=interpret,
                                       block_slots=block_slots))
    _assert_bitwise_equal(self, kernel(x, src), compaction.reference_gather(x, src))

  @parameterized.named_parameters(*_GATHER_CASES)
  def test_gpu_formulation_is_bitwise_equal(self, *case):
    self._check("gpu", True, *case)

  @parameterized.named_parameters(*_TPU_GATHER_CASES)
  def test_tpu_formulation_is_bitwise_equal(self, *case):
    self._check("tpu", pltpu.InterpretParams(detect_races=True), *case)

  def test_out_of_range_indices_are_clamped_like_the_reference(self):
    x = _cache(0, (1, 1, 6, 2, 64), F32)
    src = jnp.array([[[[9, -5], [5, 100], [0, 2]]]], jnp.int32)
    expected = compaction.reference_gather(x, src)
    _assert_bitwise_equal(self, compaction.pallas_gather(x, src, backend="gpu", interpret=True), expected)
    _assert_bitwise_equal(self, compaction.pallas_gather(x, src, backend="tpu", interpret=True), expected)


class MergeKernelTest(parameterized.TestCase):

  def _check(self, backend, interpret, layers, batch, slots, kv_heads, head_dim, out_slots, dtype, shared,
             max_run, block_slots):
    x = _cache(0, (layers, batch, slots, kv_heads, head_dim), dtype)
    shape = (layers, batch, out_slots) if shared else (layers, batch, out_slots, kv_heads)
    start, run_len = _runs(1, shape, slots, max_run)
    weight = _weights(2, (layers, batch, slots, kv_heads))
    kernel = jax.jit(functools.partial(merge.pallas_segment_merge, max_run=max_run, backend=backend,
                                       interpret=interpret, block_slots=block_slots))
    expected = merge.reference_segment_merge(x, start, run_len, weight, max_run=max_run)
    _assert_close(self, kernel(x, start, run_len, weight), expected, dtype)

  @parameterized.named_parameters(*_MERGE_CASES)
  def test_gpu_formulation_matches_reference(self, *case):
    self._check("gpu", True, *case)

  @parameterized.named_parameters(*_TPU_MERGE_CASES)
  def test_tpu_formulation_matches_reference(self, *case):
    self._check("tpu", pltpu.InterpretParams(), *case)

  def test_slots_outside_runs_never_contribute(self):
    # inf/NaN outside every run must not leak into the output (a multiply-by-zero mask would give NaN).
    x = _cache(0, (1, 1, 8, 2, 64), F32).at[0, 0, 4:].set(jnp.nan).at[0, 0, 3].set(jnp.inf)
    start = jnp.array([[[[0, 1], [2, 0], [5, 5]]]], jnp.int32)
    run_len = jnp.array([[[[2, 2], [1, 3], [0, 0]]]], jnp.int32)
    weight = _weights(2, (1, 1, 8, 2))
    expected = merge.reference_segment_merge(x, start, run_len, weight, max_run=3)
    self.assertTrue(np.isfinite(np.asarray(expected)).all())
    for backend in ("gpu", "tpu"):
      out = merge.pallas_segment_merge(x, start, run_len, weight, max_run=3, backend=backend, interpret=True)
      _assert_close(self, out, expected, F32)


# ----------------------------------------------------------------------------------------------------------
# Dispatch, validation, lowering.
# ----------------------------------------------------------------------------------------------------------


def _has_pallas_call(fn, *args):
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


class DispatchTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "cpu":
      self.skipTest("checks the CPU dispatch rule")
    self.x = _cache(0, (1, 2, 8, 2, 64), F32)
    self.src = _plan(1, (1, 2, 5, 2), 8)

  def test_auto_gather_uses_the_reference_on_cpu(self):
    self.assertFalse(_has_pallas_call(functools.partial(compaction.gather, impl="auto"), self.x, self.src))
    self.assertTrue(_has_pallas_call(functools.partial(compaction.gather, impl="pallas"), self.x, self.src))

  def test_auto_merge_uses_the_reference_on_cpu(self):
    start, run_len = _runs(1, (1, 2, 5), 8, max_run=2)
    weight = _weights(2, (1, 2, 8, 2))
    args = (self.x, start, run_len, weight)
    self.assertFalse(_has_pallas_call(functools.partial(merge.segment_merge, max_run=2), *args))
    self.assertTrue(_has_pallas_call(functools.partial(merge.segment_merge, max_run=2, impl="pallas"), *args))

  @parameterized.parameters("auto", "pallas", "reference")
  def test_dispatchers_agree_under_jit(self, impl):
    out = jax.jit(functools.partial(compaction.gather, impl=impl))(self.x, self.src)
    _assert_bitwise_equal(self, out, _numpy_gather(self.x, self.src))

  def test_rejects_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "impl="):
      compaction.gather(self.x, self.src, impl="triton")
    with self.assertRaisesRegex(ValueError, "src_index must be"):
      compaction.gather(self.x, self.src[..., :1, None])
    with self.assertRaisesRegex(ValueError, "src_index must be an integer"):
      compaction.gather(self.x, self.src.astype(jnp.float32))
    with self.assertRaisesRegex(ValueError, "backend="):
      compaction.pallas_gather(self.x, self.src, backend="cuda")
    with self.assertRaisesRegex(ValueError, "max_run"):
      merge.segment_merge(self.x, self.src, self.src, jnp.ones((1, 2, 8, 2)), max_run=0)
    with self.assertRaisesRegex(ValueError, "weight must be"):
      merge.segment_merge(self.x, self.src, self.src, jnp.ones((1, 2, 7, 2)), max_run=2)


_LOWERING_CASES = (
    ("per_head_bf16_d128", BF16, 128, False),
    ("shared_bf16_d80", BF16, 80, True),
    ("shared_f32_d128", F32, 128, True),
    ("per_head_f32_d80", F32, 80, False),
)


class LoweringTest(parameterized.TestCase):
  """Both formulations lower to backend IR for a Llama-3-8B-sized cache (no device needed).

  This runs the Python lowering (Triton IR / Mosaic MLIR, including Mosaic's block-shape and memref
  verification); the device-side Triton compile and Mosaic layout passes are not exercised.
  """

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "cpu":
      self.skipTest("cross-lowering check for CPU-only CI")

  def _export(self, fn, platform, *args):
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()

  def _llama_args(self, dtype, head_dim, shared):
    x = jax.ShapeDtypeStruct((32, 2, 4096, 8, head_dim), dtype)
    plan = jax.ShapeDtypeStruct((32, 2, 2048) + (() if shared else (8,)), jnp.int32)
    weight = jax.ShapeDtypeStruct((32, 2, 4096, 8), jnp.float32)
    return x, plan, weight

  @parameterized.named_parameters(*_LOWERING_CASES)
  def test_gpu_lowers_to_triton(self, dtype, head_dim, shared):
    x, plan, weight = self._llama_args(dtype, head_dim, shared)
    gather = functools.partial(compaction.pallas_gather, backend="gpu", interpret=False)
    self.assertIn("__gpu$xla.gpu.triton", self._export(gather, "cuda", x, plan))
    merge_fn = functools.partial(merge.pallas_segment_merge, max_run=4, backend="gpu", interpret=False)
    self.assertIn("__gpu$xla.gpu.triton", self._export(merge_fn, "cuda", x, plan, plan, weight))

  @parameterized.named_parameters(*_LOWERING_CASES)
  def test_tpu_lowers_to_mosaic(self, dtype, head_dim, shared):
    try:  # Mosaic's lowering asks for the chip's tiling; on CPU, describe a v5e (private jax API).
      from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top
      chip = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    except (ImportError, AttributeError) as e:
      self.skipTest(f"jax private TPU info API changed: {e}")
    kind = jax.devices()[0].device_kind
    self.enter_context(mock.patch.dict(tpu_info.registry, {kind: lambda: chip}))
    x, plan, weight = self._llama_args(dtype, head_dim, shared)
    gather = functools.partial(compaction.pallas_gather, backend="tpu", interpret=False)
    self.assertIn("tpu_custom_call", self._export(gather, "tpu", x, plan))
    merge_fn = functools.partial(merge.pallas_segment_merge, max_run=4, backend="tpu", interpret=False)
    self.assertIn("tpu_custom_call", self._export(merge_fn, "tpu", x, plan, plan, weight))


if __name__ == "__main__":
  absltest.main()
