"""AmoebaLLM subnet selection: the DP depth table (spec §5.1) and FLAP width masks (spec §5.2)."""

import itertools
import os
import tempfile

from absl.testing import absltest, parameterized
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.subnets import calibrate, depth, width
from lacax.subnets.shape import SubnetSpace
from tests import subnet_models as sm

CFG = sm.CFG
L = CFG.num_layers


def _Metric(params, batches):  # noqa: N802
  return calibrate.DepthMetric(params, CFG, batches)


class DepthTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.calib = sm.batches(2, seed=1)
    cls.heldout = sm.batches(2, seed=2)
    cls.metric = _Metric(sm.trained_params(), cls.calib)
    cls.strategy = depth.dp_layer_selection(cls.metric, L, min_layers=L - 3, keep_last=1)

  def test_m1_is_the_brute_force_best_single_removal(self):
    metric = _Metric(sm.trained_params(), self.calib)
    values = []
    for i in range(L - 1):
      mask = np.ones(L, np.int32)
      mask[i] = 0
      values.append(metric(mask))
    best = int(np.argmin(values))
    expected = tuple(0 if i == best else 1 for i in range(L))
    self.assertEqual(self.strategy.strategy[1], expected)
    self.assertAlmostEqual(self.strategy.metric[1], min(values), places=6)

  def test_shape_cost_and_consistency(self):
    s = self.strategy
    self.assertEqual(s.num_evaluations, sum(min(n, 3) for n in range(1, L)))  # sum_n min(n, M), N = L - 1
    self.assertEqual(self.metric.calls, s.num_evaluations)
    self.assertEqual(s.num_evaluations, depth.dp_evaluation_count(L, 1, 3))
    for m in range(0, 4):
      mask = s.strategy[m]
      self.assertEqual(mask.count(0), m)
      self.assertEqual(mask[-1], 1)  # keep_last
      self.assertEqual(s.mask(L - m), mask)
      if m:
        self.assertAlmostEqual(_Metric(sm.trained_params(), self.calib)(np.asarray(mask)), s.metric[m], places=6)

  def test_never_worse_than_dropping_last_or_every_kth(self):
    last = depth.drop_last_strategy(L, min_layers=L - 3)
    uniform = depth.uniform_strategy(L, min_layers=L - 3)
    cal = _Metric(sm.trained_params(), self.calib)
    held = _Metric(sm.trained_params(), self.heldout)
    gaps = {}
    for m in range(1, 4):
      dp = self.strategy.metric[m]
      self.assertLessEqual(dp, cal(np.asarray(last.strategy[m])) + 1e-9)
      self.assertLessEqual(dp, cal(np.asarray(uniform.strategy[m])) + 1e-9)
      # Held-out (the overfitting watch for a small calibration set): at most 0.01 nats worse.
      gaps[m] = held(np.asarray(self.strategy.strategy[m])) - min(held(np.asarray(last.strategy[m])),
                                                                   held(np.asarray(uniform.strategy[m])))
    self.assertLessEqual(max(gaps.values()), 0.01, gaps)

  def test_exact_on_additive_metric_and_gap_to_brute_force(self):
    rng = np.random.RandomState(0)
    cost = rng.rand(L)
    additive = lambda mask: float(np.sum(cost * (1 - mask)))  # noqa: E731  optimal substructure holds
    s = depth.dp_layer_selection(additive, L, min_layers=L - 3, keep_last=1)
    for m in range(1, 4):
      best = min(sum(cost[list(c)]) for c in itertools.combinations(range(L - 1), m))
      self.assertAlmostEqual(s.metric[m], best, places=12)
    # An accuracy-style objective (higher is better) chooses symmetrically.
    s_acc = depth.dp_layer_selection(lambda mask: -additive(mask), L, min_layers=L - 3, higher_is_better=True)
    self.assertEqual(s_acc.strategy, s.strategy)

  def test_constructed_small_residual_blocks_are_the_ones_dropped(self):
    p = sm.trained_params()
    small = (1, 4, 5)
    scale = np.ones(L, np.float32)
    scale[list(small)] = 0.01
    layers = dict(p["layers"])
    layers["wo"] = layers["wo"] * scale[:, None, None, None]
    layers["w_down"] = layers["w_down"] * scale[:, None, None]
    s = depth.dp_layer_selection(_Metric({**p, "layers": layers}, self.calib), L, min_layers=L - 3)
    self.assertEqual({i for i, v in enumerate(s.strategy[3]) if not v}, set(small))

  def test_ties_keep_the_layer(self):
    s = depth.dp_layer_selection(lambda mask: 1.0, L, min_layers=L - 2)
    # Every evaluation ties, so only forced removals happen: the m deepest candidates.
    self.assertEqual(s.strategy, depth.drop_last_strategy(L, min_layers=L - 2).strategy)

  def test_block_influence_matches_its_definition(self):
    stats, bi = calibrate.collect_statistics(sm.trained_params(), CFG, self.calib)
    toks = jnp.asarray(self.calib[0])
    hidden, _, _ = calibrate.layer_taps(sm.trained_params(), toks, sm.positions(toks), cfg=CFG)
    h = np.asarray(hidden, np.float64)
    i = 3
    cos = np.sum(h[i] * h[i + 1], -1) / (np.linalg.norm(h[i], axis=-1) * np.linalg.norm(h[i + 1], axis=-1))
    toks1 = jnp.asarray(self.calib[1])
    h1 = np.asarray(calibrate.layer_taps(sm.trained_params(), toks1, sm.positions(toks1), cfg=CFG)[0], np.float64)
    cos1 = np.sum(h1[i] * h1[i + 1], -1) / (np.linalg.norm(h1[i], axis=-1) * np.linalg.norm(h1[i + 1], axis=-1))
    self.assertAlmostEqual(bi[i], 1 - np.mean([cos.mean(), cos1.mean()]), places=6)
    s = depth.block_influence_strategy(bi, min_layers=L - 3)
    removed = {j for j, v in enumerate(s.strategy[2]) if not v}
    self.assertEqual(removed, set(np.argsort(bi[:L - 1])[:2].tolist()))
    self.assertEqual(stats.count, 2 * 4 * 24)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r"depth=4 is out of range.*5\.\.8"):
      self.strategy.mask(4)
    with self.assertRaisesRegex(ValueError, r"depth=9 is out of range"):
      self.strategy.mask(9)
    with self.assertRaisesRegex(ValueError, r"max_removed=8 must be in \[0, .* = 7\]"):
      depth.dp_layer_selection(lambda m: 0.0, L, min_layers=0)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "depth.json")
      s = depth.dp_layer_selection(lambda m: float(m.sum()), L, min_layers=L - 2,
                                   model=depth.model_signature(CFG))
      s.save(path)
      self.assertEqual(depth.load_strategy(path, CFG), s)
      other = CFG.replace(num_layers=12, name="other")
      with self.assertRaisesRegex(ValueError, r"depth\.json was made for another model: num_layers=8 there, "
                                              r"but the model has num_layers=12"):
        depth.load_strategy(path, other)


class WidthTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.calib = sm.batches(2, seed=1)
    cls.stats, _ = calibrate.collect_statistics(sm.trained_params(), CFG, cls.calib)
    p = sm.trained_params()
    cls.widths = (1.0, 0.875, 0.75, 0.625, 0.5)
    cls.masks = width.flap_width_masks(cls.stats, p["layers"]["wo"], p["layers"]["w_down"], CFG, cls.widths)

  def test_parameter_budget(self):
    unit = width.group_param_count(CFG)
    total = L * (CFG.num_kv_heads * unit + CFG.intermediate_size * width.ffn_channel_param_count(CFG))
    for w in self.widths:
      g, f, _, _ = self.masks.masks(w)
      kept = g.sum() * unit + f.sum() * width.ffn_channel_param_count(CFG)
      self.assertLessEqual(abs(kept - w * total), unit / 2 + 1e-6, (w, kept, w * total))
      self.assertAlmostEqual(width.kept_fraction(g, f, CFG), kept / total)
    # The reference's strict threshold keeps exactly one unit fewer than the closest prefix.
    p = sm.trained_params()
    ref = width.flap_width_masks(self.stats, p["layers"]["wo"], p["layers"]["w_down"], CFG, self.widths,
                                 rule="reference")
    for w in self.widths[1:]:
      n_closest = self.masks.group_mask[w].sum() + self.masks.ffn_mask[w].sum()
      self.assertEqual(ref.group_mask[w].sum() + ref.ffn_mask[w].sum(), n_closest - 1)

  def test_nested_and_non_uniform(self):
    for big, small in zip(self.widths, self.widths[1:]):
      self.assertTrue(np.all(self.masks.group_mask[small] <= self.masks.group_mask[big]))
      self.assertTrue(np.all(self.masks.ffn_mask[small] <= self.masks.ffn_mask[big]))
    self.assertGreater(len(set(self.masks.ffn_mask[0.5].sum(axis=1).tolist())), 1)  # adaptive across layers

  def test_qkv_masks_agree_per_group(self):
    space = SubnetSpace(depth.drop_last_strategy(L, min_layers=L), self.masks, self.widths, L)
    a = space.arrays(space.shape(L, 0.625), CFG)
    np.testing.assert_array_equal(np.asarray(a.head_mask),
                                  np.repeat(np.asarray(a.kv_mask), CFG.group_size, axis=1))

  def test_bias_compensation_keeps_mean_output(self):
    toks = [jnp.asarray(b) for b in self.calib]
    taps = [calibrate.layer_taps(sm.trained_params(), t, sm.positions(t), cfg=CFG) for t in toks]
    attn_in = np.concatenate([np.asarray(t[1]).reshape(L, -1, CFG.num_heads, CFG.head_dim) for t in taps], 1)
    ffn_in = np.concatenate([np.asarray(t[2]).reshape(L, -1, CFG.intermediate_size) for t in taps], 1)
    p = sm.trained_params()
    wo = np.asarray(p["layers"]["wo"], np.float64)
    wd = np.asarray(p["layers"]["w_down"], np.float64)
    g, f, b_attn, b_ffn = self.masks.masks(0.625)
    head = np.repeat(g, CFG.group_size, axis=1)
    for l in range(L):
      dense = np.einsum("nhk,hkd->d", attn_in[l], wo[l]) / attn_in.shape[1]
      pruned = np.einsum("nhk,hkd->d", attn_in[l] * head[l][None, :, None], wo[l]) / attn_in.shape[1] + b_attn[l]
      np.testing.assert_allclose(pruned, dense, atol=1e-5)
      dense = np.einsum("nf,fd->d", ffn_in[l], wd[l]) / ffn_in.shape[1]
      pruned = np.einsum("nf,fd->d", ffn_in[l] * f[l][None], wd[l]) / ffn_in.shape[1] + b_ffn[l]
      np.testing.assert_allclose(pruned, dense, atol=1e-5)
    self.assertGreater(np.abs(b_ffn).max(), 1e-3)  # the compensation is not trivially zero

  def test_width_one_is_the_identity(self):
    g, f, ba, bf = self.masks.masks(1.0)
    self.assertTrue(g.all() and f.all())
    self.assertEqual(np.abs(ba).max(), 0.0)
    self.assertEqual(np.abs(bf).max(), 0.0)

  def test_taps_reproduce_the_forward(self):
    t = jnp.asarray(self.calib[0])
    hidden, _, _ = calibrate.layer_taps(sm.trained_params(), t, sm.positions(t), cfg=CFG)
    logits, _ = llama.forward(sm.trained_params(), t, sm.positions(t), None, CFG)
    np.testing.assert_allclose(np.asarray(calibrate.final_logits(sm.trained_params(), hidden[-1], CFG)),
                               np.asarray(logits), atol=1e-6)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r"width=0\.6 is not in the trained width grid \[1\.0, 0\.875"):
      self.masks.masks(0.6)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "width.npz")
      self.masks.save(path)
      loaded = width.load_width_masks(path, CFG)
      for w in self.widths:
        np.testing.assert_array_equal(loaded.ffn_mask[w], self.masks.ffn_mask[w])
        np.testing.assert_array_equal(loaded.attn_bias[w], self.masks.attn_bias[w])
      with self.assertRaisesRegex(ValueError, r"width\.npz was made for another model: intermediate_size=96 there"):
        width.load_width_masks(path, CFG.replace(intermediate_size=128))
      bogus = os.path.join(d, "bogus.npz")
      np.savez(bogus, x=np.zeros(3))
      with self.assertRaisesRegex(ValueError, r"bogus\.npz is not a lacax width mask file"):
        width.load_width_masks(bogus)


if __name__ == "__main__":
  absltest.main()
