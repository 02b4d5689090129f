"""Heterogeneous layers (`ModelConfig.layer_shapes`, `params["layers"]` as segments): a physically sliced
subnet gives the logits of the masked full model, with and without a KV cache, and round-trips on disk."""

import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache.kv_cache import init_cache
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.weights import checkpoint
from lacax.weights import loader

_run = jax.jit(llama.run, static_argnames=("cfg",))
_CFG = config_lib.ModelConfig(vocab_size=70, hidden_size=64, intermediate_size=48, num_layers=4, num_heads=4,
                              num_kv_heads=2, head_dim=32)
# Per layer: kept query heads (kv group = head // 2) and kept MLP channels.
_HEADS = [[0, 1, 2, 3], [0, 3], [1, 2], [0, 1]]
_RNG = np.random.RandomState(0)
_CHANNELS = [np.arange(48), np.sort(_RNG.choice(48, 32, replace=False)), np.sort(_RNG.choice(48, 32, replace=False)),
             np.sort(_RNG.choice(48, 16, replace=False))]
_SEGMENTS = [(0, 1), (1, 3), (3, 4)]  # layer ranges of equal shape


def _slice(params):
  """The sliced model of the masks above: one stacked segment per layer range."""
  lay = params["layers"]
  segments, shapes = [], []
  for start, stop in _SEGMENTS:
    per_layer = []
    for l in range(start, stop):
      heads = np.asarray(_HEADS[l])
      kv = np.unique(heads // 2)
      ch = _CHANNELS[l]
      per_layer.append({
          "attn_norm": lay["attn_norm"][l], "mlp_norm": lay["mlp_norm"][l],
          "wq": lay["wq"][l][:, heads], "wk": lay["wk"][l][:, kv], "wv": lay["wv"][l][:, kv],
          "wo": lay["wo"][l][heads], "w_gate": lay["w_gate"][l][:, ch], "w_up": lay["w_up"][l][:, ch],
          "w_down": lay["w_down"][l][ch]})
    segments.append(jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer))
    shapes.append((stop - start, len(_HEADS[start]), len(np.unique(np.asarray(_HEADS[start]) // 2)),
                   len(_CHANNELS[start])))
  return {**params, "layers": segments}, _CFG.replace(layer_shapes=tuple(shapes))


def _masks():
  head_mask = np.zeros((4, 4), np.float32)
  ffn_mask = np.zeros((4, 48), np.float32)
  for l in range(4):
    head_mask[l, _HEADS[l]] = 1
    ffn_mask[l, _CHANNELS[l]] = 1
  return llama.ForwardOptions(head_mask=jnp.asarray(head_mask), ffn_mask=jnp.asarray(ffn_mask))


class SegmentsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.params = llama.init_params(_CFG, jax.random.PRNGKey(0), std=0.25)
    self.sliced, self.sliced_cfg = _slice(self.params)
    self.tokens = jnp.asarray(np.random.RandomState(1).randint(0, 70, (2, 9)), jnp.int32)
    positions = np.tile(np.arange(9, dtype=np.int32), (2, 1))
    positions[1, 6:] = -1
    self.positions = jnp.asarray(positions)

  def test_config_declares_the_segments(self):
    self.assertEqual(self.sliced_cfg.layer_shapes, ((1, 4, 2, 48), (2, 2, 2, 32), (1, 2, 1, 16)))
    shapes = llama.param_shapes(self.sliced_cfg)
    self.assertEqual(jax.tree.map(lambda x: x.shape, shapes), jax.tree.map(lambda x: x.shape, self.sliced))
    self.assertEqual(self.sliced_cfg.num_params(), sum(x.size for x in jax.tree.leaves(self.sliced)))
    with self.assertRaisesRegex(ValueError, r"layer_shapes=.*holds 3 layers; num_layers=4"):
      _CFG.replace(layer_shapes=((3, 4, 2, 48),))
    with self.assertRaisesRegex(ValueError, r"layer_shapes\[0\]=\(4, 8, 2, 48\) exceeds"):
      _CFG.replace(layer_shapes=((4, 8, 2, 48),))
    with self.assertRaisesRegex(ValueError, r"params hold layer segments"):
      llama.run(self.sliced, self.tokens, self.positions, None, self.sliced_cfg.replace(
          layer_shapes=((1, 4, 2, 48), (2, 2, 2, 32), (1, 2, 2, 16))))

  def test_sliced_logits_equal_masked_logits(self):
    real = np.asarray(self.positions) >= 0
    masked = _run(self.params, self.tokens, self.positions, None, cfg=_CFG, options=_masks())
    sliced = _run(self.sliced, self.tokens, self.positions, None, cfg=self.sliced_cfg)
    np.testing.assert_allclose(np.asarray(sliced.logits)[real], np.asarray(masked.logits)[real], atol=2e-5, rtol=0)
    full = _run(self.params, self.tokens, self.positions, None, cfg=_CFG)
    self.assertGreater(float(np.abs(np.asarray(full.logits) - np.asarray(masked.logits))[real].max()), 1e-2)

  def test_cached_prefill_and_decode_equal_masked_and_the_cache_works(self):
    for rope_mode in ("slot", "stored"):
      caches = {"m": init_cache(_CFG, 2, 16, rope_mode=rope_mode),
                "s": init_cache(self.sliced_cfg, 2, 16, rope_mode=rope_mode)}
      self.assertEqual(caches["s"].k.shape, caches["m"].k.shape)  # the widest kv heads
      run_m = lambda t, p: _run(self.params, t, p, caches["m"], cfg=_CFG, options=_masks())  # noqa: E731
      run_s = lambda t, p: _run(self.sliced, t, p, caches["s"], cfg=self.sliced_cfg)  # noqa: E731
      tokens, positions = self.tokens, self.positions
      for step in range(3):
        m, s = run_m(tokens, positions), run_s(tokens, positions)
        real = np.asarray(positions) >= 0
        np.testing.assert_allclose(np.asarray(s.logits)[real], np.asarray(m.logits)[real], atol=2e-5, rtol=0)
        caches = {"m": m.cache, "s": s.cache}
        tokens = jnp.argmax(m.logits[:, -1:], axis=-1).astype(jnp.int32)
        positions = jnp.max(positions, axis=1, keepdims=True) + 1
      # Layer 3 has one kv head: the second stays empty.
      np.testing.assert_array_equal(np.asarray(caches["s"].pos[3, :, :, 1]), -1)
    out = generation.generate(self.sliced, self.sliced_cfg, [[3, 4, 5], [9]], max_new_tokens=4, bucket=4)
    self.assertEqual([len(t) for t in out.tokens], [4, 4])

  def test_checkpoint_round_trip(self):
    directory = os.path.join(tempfile.mkdtemp(), "sliced")
    checkpoint.save_params(directory, self.sliced, self.sliced_cfg)
    cfg = checkpoint.load_config(directory)
    self.assertEqual(cfg, self.sliced_cfg)
    restored = checkpoint.restore_params(directory)
    self.assertIsInstance(restored["layers"], list)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(self.sliced)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = loader.load_model(directory)
    self.assertEqual(model.cfg, self.sliced_cfg)
    got = _run(model.params, self.tokens, self.positions, None, cfg=model.cfg)
    want = _run(self.sliced, self.tokens, self.positions, None, cfg=self.sliced_cfg)
    np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(want.logits))


if __name__ == "__main__":
  absltest.main()
