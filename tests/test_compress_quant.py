"""Quantizers (grid, idempotence, STE window, per-token) and packed low-bit weights (Edge-LLM, issue 13)."""

import os
import tempfile

from absl.testing import absltest, parameterized
import gguf
import jax
import jax.numpy as jnp
import numpy as np

from lacax.compress import packed, quant
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.model.quantized import PackedTable, PackedWeight, pack_codes, unpack_codes
from lacax.weights import gguf as gguf_weights


class QuantizerTest(parameterized.TestCase):

  @parameterized.parameters((8, None), (4, None), (3, 16), (2, 16), (4, 8))
  def test_grid_max_error_and_idempotence(self, bits, group):
    rng = np.random.default_rng(bits)
    w = jnp.asarray(rng.normal(size=(2, 32, 12)), jnp.float32)  # [lead, K, N]
    q = np.asarray(quant.fake_quant_matrix(w, bits, group, ste_window=None))
    g = 32 if group is None else group
    m = 2 ** (bits - 1) - 1
    wg = np.asarray(w).reshape(2, 32 // g, g, 12)
    qg = q.reshape(wg.shape)
    scale = np.abs(wg).max(axis=2, keepdims=True) / m
    k = qg / scale
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)                   # on the grid k * max / m
    self.assertLessEqual(np.abs(np.round(k)).max(), m)
    for a in range(2):
      for b in range(32 // g):
        for n in range(12):
          self.assertLessEqual(len(np.unique(qg[a, b, :, n])), 2 ** bits - 1)
    # The group max comes back up to the rounding of (max / m) * m in float32.
    np.testing.assert_allclose(np.abs(qg).max(axis=2), np.abs(wg).max(axis=2), rtol=2.5e-7, atol=0)
    self.assertTrue(np.all(np.abs(qg - wg) <= scale / 2 + 1e-6))
    q2 = np.asarray(quant.fake_quant_matrix(jnp.asarray(q), bits, group, ste_window=None))
    np.testing.assert_allclose(q2, q, rtol=0, atol=1e-6)                    # idempotent

  def test_straight_through_window(self):
    x = jnp.asarray([-3.0, -2.0, -1.99, -0.5, 0.0, 0.7, 1.99, 2.0, 2.5])
    for window, expected in ((2.0, [0, 0, 1, 1, 1, 1, 1, 0, 0]), (1.0, [0, 0, 0, 1, 1, 1, 0, 0, 0]),
                             (None, [1] * 9)):
      g = jax.grad(lambda v: jnp.sum(quant.fake_quant_matrix(v[:, None], 4, ste_window=window)))(x)
      np.testing.assert_array_equal(np.asarray(g), expected, err_msg=str(window))
      g = jax.grad(lambda v: jnp.sum(quant.fake_quant_tokens(v[None], 4, ste_window=window)))(x)
      np.testing.assert_array_equal(np.asarray(g), expected, err_msg=f"tokens {window}")

  def test_per_token_activation_scale(self):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)) * np.arange(1, 6)[None, :, None],
                    jnp.float32)
    q = np.asarray(quant.fake_quant_tokens(x, 8, ste_window=None))
    np.testing.assert_allclose(np.abs(q).max(-1), np.abs(np.asarray(x)).max(-1), rtol=2.5e-7, atol=0)
    scale = np.abs(np.asarray(x)).max(-1, keepdims=True) / 127
    self.assertTrue(np.all(np.abs(q - np.asarray(x)) <= scale / 2 + 1e-6))

  def test_bad_bits_named(self):
    with self.assertRaisesRegex(ValueError, "bits=1"):
      quant.qmax(1)
    with self.assertRaisesRegex(ValueError, "group_size=5"):
      quant.fake_quant_matrix(jnp.ones((8, 2)), 4, 5)


class PackedWeightTest(parameterized.TestCase):

  @parameterized.parameters(8, 4, 3, 2)
  def test_pack_round_trip(self, bits):
    sb = 8 if bits > 4 else (4 if bits > 2 else 2)
    codes = np.random.default_rng(bits).integers(0, 2 ** sb, size=(3, 32, 5)).astype(np.uint8)
    packed_np = pack_codes(codes, bits)
    self.assertEqual(packed_np.shape, (3, 32 * sb // 8, 5))
    np.testing.assert_array_equal(np.asarray(pack_codes(jnp.asarray(codes), bits)), packed_np)
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(packed_np), bits)), codes)

  @parameterized.parameters((8, None), (4, 16), (3, 8), (2, 16))
  def test_matmul_equals_dequantized_reference_and_fake_quant(self, bits, group):
    rng = np.random.default_rng(bits)
    w = jnp.asarray(rng.normal(size=(2, 32, 4, 8)), jnp.float32)  # like wq [L, D, H, hd]
    pw = PackedWeight.quantize(w, 1, bits, group)
    self.assertEqual(pw.shape, w.shape)
    dense = pw.dense()
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(quant.fake_quant_weight(w, 1, bits, group,
                                                                                         ste_window=None)))
    x = jnp.asarray(rng.normal(size=(3, 5, 32)), jnp.float32)
    got = jax.vmap(lambda p: p.project(x, "btd,dhk->bthk"))(pw)
    want = jnp.einsum("btd,ldhk->lbthk", x, dense)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # Resident bytes: codes at their storage width plus scales.
    sb = 8 if bits > 4 else (4 if bits > 2 else 2)
    groups = 32 // (32 if group is None else group)
    self.assertEqual(pw.nbytes, 2 * 32 * 32 * sb // 8 + 2 * groups * 32 * 4)

  def test_resident_bytes_fall_with_bits(self):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    sizes = [packed.layer_param_bytes({"layers": packed.compress_layers(
        params["layers"], [b, b], [None, None], storage="packed", group_size=32)}) for b in (8, 4, 2)]
    dense = packed.layer_param_bytes(params)
    self.assertLess(sizes[0], dense / 3)
    self.assertLess(sizes[1], sizes[0] * 0.6)
    self.assertLess(sizes[2], sizes[1] * 0.7)


class GGUFPackedTest(parameterized.TestCase):
  """GGUF Q8_0 / Q4_0 / Q4_1 tensors kept as codes: dense() == gguf.quants.dequantize, bit for bit."""

  @parameterized.parameters("Q8_0", "Q4_0", "Q4_1")
  def test_synthetic_file(self, qtype_name):
    from tests import test_gguf  # pylint: disable=g-import-not-at-top

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    path = os.path.join(tmp.name, "model.gguf")
    hf = test_gguf._hf_weights(np.random.default_rng(0), tied=True, bias=False)  # pylint: disable=protected-access
    test_gguf._write_gguf(path, hf, qtype=qtype)  # pylint: disable=protected-access
    cfg, dense = gguf_weights.read_gguf(path)
    cfg_q, kept = gguf_weights.read_gguf(path, keep_quantized=True)
    self.assertEqual(cfg, cfg_q)
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
      pw = kept["layers"][name]
      self.assertIsInstance(pw, PackedWeight, name)
      self.assertEqual(pw.bits, 8 if qtype_name == "Q8_0" else 4)
      self.assertEqual(pw.scales.dtype, np.float16)
      np.testing.assert_array_equal(np.asarray(pw.dense()), dense["layers"][name], err_msg=name)
    table = kept["embed"]  # the embedding / tied head keeps its blocks too
    self.assertIsInstance(table, PackedTable)
    self.assertEqual((table.bits, table.scales.dtype), (8 if qtype_name == "Q8_0" else 4, np.float16))
    np.testing.assert_array_equal(np.asarray(table.dense()), dense["embed"])
    if qtype_name != "Q4_1":
      return
    # And the forward computes with them.
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    a, _ = llama.forward(jax.tree.map(jnp.asarray, kept), tokens, pos, None, cfg)
    b, _ = llama.forward(jax.tree.map(jnp.asarray, dense), tokens, pos, None, cfg)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

  def test_embedded_smollm2_q4_1_tensor(self):
    path = gguf_weights.smollm2_gguf_path()
    reader = gguf.GGUFReader(path)
    tensor = {t.name: t for t in reader.tensors}["blk.3.ffn_down.weight"]
    self.assertEqual(tensor.tensor_type.name, "Q4_1")
    codes, scales, mins, bits = gguf_weights._GGUFTensors(reader).get_codes("blk.3.ffn_down.weight")  # pylint: disable=protected-access
    pw = PackedWeight.from_codes(codes.T, scales.T, mins.T, bits=bits, group_size=32,
                                 in_shape=(codes.shape[1],), out_shape=(codes.shape[0],))
    want = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(codes.shape)
    np.testing.assert_array_equal(np.asarray(pw.dense()), want.T)
    self.assertLess(pw.nbytes, want.nbytes / 6)
    table = {t.name: t for t in reader.tensors}["token_embd.weight"]  # Q8_0, loaded as a PackedTable
    self.assertEqual(table.tensor_type.name, "Q8_0")
    kept = gguf_weights._load_packed_table(gguf_weights._GGUFTensors(reader), ("embed",),  # pylint: disable=protected-access
                                           "model.embed_tokens.weight")
    want = gguf.quants.dequantize(table.data, table.tensor_type)
    np.testing.assert_array_equal(np.asarray(kept.dense()), want)
    self.assertLess(kept.nbytes, want.nbytes / 3.5)


if __name__ == "__main__":
  absltest.main()
