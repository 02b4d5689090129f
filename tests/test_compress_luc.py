"""LUC: sensitivity tables, sparsity / bit allocation, policies and the budget search, apply_policy
(Edge-LLM, issue 13)."""

import json
import os
import tempfile

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax.compress import allocate, apply, packed, policy as policy_lib, sensitivity
from lacax.compress.policy import CompressionPolicy
from lacax.errors import ConfigError, FileFormatError, ValidationError
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.model.quantized import PackedWeight


class AllocationTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.sens = np.random.default_rng(0).gamma(2.0, size=12)

  @parameterized.product(mode=allocate.MODES, target=(0.3, 0.5))
  def test_mean_exact_and_monotone(self, mode, target):
    s = allocate.allocate_sparsity(self.sens, target, mode=mode)
    self.assertAlmostEqual(float(np.mean(s)), target, places=12)
    order = np.argsort(self.sens)
    self.assertTrue(np.all(np.diff(s[order]) <= 1e-12))        # non-increasing in sensitivity
    self.assertEqual(s[np.argmax(self.sens)], 0.0)              # the most sensitive layer gets the minimum

  def test_reference_formula(self):
    sens = np.array([1.0, 2.0, 4.0, 3.0])
    s_hat = (sens - 1.0) / 3.0
    expect = 0.5 * 4 * (1 - s_hat) / np.sum(1 - s_hat)
    np.testing.assert_allclose(allocate.allocate_sparsity(sens, 0.5), expect, rtol=0, atol=1e-15)

  @parameterized.parameters((0.5, 0.2, 0.6), (0.4, 0.1, 0.45), (0.3, 0.3, 0.9))
  def test_clipping_keeps_the_mean(self, target, lo, hi):
    s = allocate.allocate_sparsity(self.sens, target, s_min=lo, s_max=hi)
    self.assertAlmostEqual(float(np.mean(s)), target, places=12)
    self.assertGreaterEqual(s.min(), lo - 1e-15)
    self.assertLessEqual(s.max(), hi + 1e-15)
    order = np.argsort(self.sens)
    self.assertTrue(np.all(np.diff(s[order]) <= 1e-12))

  def test_infeasible_bounds_named(self):
    with self.assertRaisesRegex(ConfigError, "target sparsity=0.7 with s_min=0.0, s_max=0.6"):
      allocate.allocate_sparsity(self.sens, 0.7, s_max=0.6)

  def test_bits_above_mean_get_more(self):
    q = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    bits = allocate.allocate_bits(q, base_bits=4, high_bits=8)
    np.testing.assert_array_equal(bits, [4, 8, 4, 8, 4])
    above, below = bits[q > q.mean()], bits[q <= q.mean()]
    self.assertGreaterEqual(above.min(), below.max())


def _records(L, ratios, bits, rng):
  return {f"layer{l}": {"prune": sorted(rng.random(len(ratios)).tolist()), "quant": rng.random(len(bits)).tolist(),
                        "rel_prune": rng.random(len(ratios)).tolist(), "rel_quant": rng.random(len(bits)).tolist()}
          for l in range(L)}


class TableTest(absltest.TestCase):

  def test_order_invariance_of_records(self):
    # The reference's os.walk bug: the layer index must come from the name, never the listing order.
    ratios, bits = (0.1, 0.5), (4, 8)
    header = {"ratios": ratios, "bits": bits, "model": {"name": "m"}}
    records = _records(10, ratios, bits, np.random.default_rng(0))
    keys = list(records)
    base = sensitivity.SensitivityTable.from_layer_records(records, header)
    for seed in range(3):
      shuffled = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
      table = sensitivity.SensitivityTable.from_layer_records({k: records[k] for k in shuffled}, header)
      np.testing.assert_array_equal(table.prune, base.prune)
      sens = allocate.layer_scores(table.prune)
      np.testing.assert_array_equal(allocate.allocate_sparsity(sens, 0.5),
                                    allocate.allocate_sparsity(allocate.layer_scores(base.prune), 0.5))
    self.assertEqual(base.prune[3].tolist(), records["layer3"]["prune"])

  def test_bad_tables_named(self):
    header = {"ratios": (0.1,), "bits": (4,), "model": {}}
    records = _records(3, (0.1,), (4,), np.random.default_rng(0))
    del records["layer1"]
    with self.assertRaisesRegex(FileFormatError, r"layers \[1\] are missing"):
      sensitivity.SensitivityTable.from_layer_records(records, header)
    with self.assertRaisesRegex(FileFormatError, "'block3' is not named layer<index>"):
      sensitivity.SensitivityTable.from_layer_records({"block3": {}}, header)


class LUCModelTest(parameterized.TestCase):
  """Measured on a tiny random model: the table, policies, the search and apply_policy."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                          num_kv_heads=2, name="tiny")
    cls.params = llama.init_params(cls.cfg, jax.random.PRNGKey(0), std=0.2)
    cls.tokens = np.random.default_rng(0).integers(0, 64, size=(2, 24))
    cls.table = sensitivity.measure(cls.params, cls.cfg, cls.tokens, ratios=(0.25, 0.5, 0.75), bits=(2, 4, 8),
                                    group_size=16, block_size=16)
    cls.tmp = tempfile.TemporaryDirectory()

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_table_is_measured(self):
    t = self.table
    self.assertEqual(t.prune.shape, (4, 3))
    self.assertEqual(t.quant.shape, (4, 3))
    self.assertTrue(np.all(np.diff(t.prune, axis=1) > 0))      # more pruning, more error
    self.assertTrue(np.all(np.diff(t.quant, axis=1) < 0))      # more bits, less error
    self.assertTrue(np.all(t.rel_prune > 0))

  def test_save_load_and_other_model_refused(self):
    for ext in ("json", "npz"):
      path = os.path.join(self.tmp.name, f"sens.{ext}")
      self.table.save(path)
      back = sensitivity.SensitivityTable.load(path, params=self.params, cfg=self.cfg)
      np.testing.assert_array_equal(back.prune, self.table.prune)
      np.testing.assert_array_equal(back.rel_quant, self.table.rel_quant)
      other = llama.init_params(self.cfg, jax.random.PRNGKey(7), std=0.2)
      with self.assertRaisesRegex(sensitivity.SensitivityMismatch, "measured on model 'tiny'"):
        sensitivity.SensitivityTable.load(path, params=other, cfg=self.cfg)
      wider = self.cfg.replace(intermediate_size=96, name="wider")
      with self.assertRaisesRegex(sensitivity.SensitivityMismatch, "not on this model 'wider'"):
        self.table.check_model(llama.init_params(wider, jax.random.PRNGKey(0)), wider)
    # JSON keys carry the layer index.
    with open(os.path.join(self.tmp.name, "sens.json")) as f:
      self.assertEqual(sorted(json.load(f)["layers"]), ["layer0", "layer1", "layer2", "layer3"])

  def test_policy_json_round_trip_and_validation(self):
    p = policy_lib.luc_policy(self.table, self.cfg, 0.5, base_bits=4, high_bits=8, group_size=16, block_size=16)
    self.assertAlmostEqual(float(np.mean(p.sparsity)), 0.5, places=12)
    path = os.path.join(self.tmp.name, "policy.json")
    p.save(path)
    self.assertEqual(CompressionPolicy.load(path), p)
    bad = CompressionPolicy(sparsity=(0.5, 1.2, 0.0), w_bits=(4, 9, None), method="obs", group_size=5)
    with self.assertRaises(ValidationError) as ctx:
      bad.validate(self.cfg)
    text = str(ctx.exception)
    for fragment in ("sparsity has 3 layers; the model has 4", "sparsity[1]=1.2", "w_bits[1]=9",
                     "method='obs'", "group_size=5"):
      self.assertIn(fragment, text)
    with self.assertRaisesRegex(ConfigError, r"unknown field\(s\) \['bitz'\]"):
      CompressionPolicy.from_json({**p.to_json(), "bitz": 3})

  @parameterized.parameters(0.35, 0.5, 0.8)
  def test_search_meets_budget_deterministically(self, fraction):
    full = policy_lib.policy_bytes(policy_lib.uniform_policy(self.cfg, 0.0, 8, group_size=16), self.cfg)
    fixed = policy_lib.fixed_bytes(self.cfg)
    budget = fixed + fraction * (full - fixed)
    p = policy_lib.search_policy(self.table, self.cfg, budget, group_size=16, block_size=16)
    self.assertLessEqual(policy_lib.policy_bytes(p, self.cfg), budget)
    self.assertEqual(policy_lib.search_policy(self.table, self.cfg, budget, group_size=16, block_size=16), p)
    # No uniform policy of the same candidates that fits is predicted better.
    for s in (0.0,) + self.table.ratios:
      for b in self.table.bits:
        u = policy_lib.uniform_policy(self.cfg, s, b, group_size=16)
        if policy_lib.policy_bytes(u, self.cfg) <= budget:
          self.assertLessEqual(policy_lib.predicted_cost(p, self.table),
                               policy_lib.predicted_cost(u, self.table) + 1e-12)
    with self.assertRaisesRegex(ConfigError, "budget_bytes=10 is below the smallest policy"):
      policy_lib.search_policy(self.table, self.cfg, 10, group_size=16)

  def test_byte_model(self):
    cfg = self.cfg
    dense = policy_lib.layer_bytes(cfg, 0.0, None)
    n = sum(k * n for k, n in policy_lib.projection_shapes(cfg).values())
    self.assertEqual(dense, 4 * n)
    self.assertEqual(policy_lib.layer_bytes(cfg, 0.5, 4, group_size=16), n * 0.5 * 0.5 + n / 8 + n / 16 * 4)
    per_channel_scales = sum(4 * outputs for _, outputs in policy_lib.projection_shapes(cfg).values())
    # 2:4 at 8 bits: half the values, a 2-bit position per kept value, one float32 scale per output channel.
    self.assertEqual(policy_lib.layer_bytes(cfg, 0.5, 8, nm=(2, 4)), n * 0.5 + n * 0.5 * 2 / 8 + per_channel_scales)

  def test_apply_policy_packed_equals_fake(self):
    p = policy_lib.luc_policy(self.table, self.cfg, 0.5, base_bits=4, high_bits=8, group_size=16, block_size=16)
    fake = apply.apply_policy(self.params, self.cfg, p, self.tokens)
    pk = apply.apply_policy(self.params, self.cfg, CompressionPolicy(**{**p.__dict__, "storage": "packed"}),
                            self.tokens)
    self.assertIsInstance(pk["layers"], list)
    self.assertIsInstance(pk["layers"][0]["wq"], PackedWeight)
    tokens = jnp.asarray(self.tokens)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits_fake, _ = llama.forward(fake, tokens, pos, None, self.cfg)
    logits_packed, _ = llama.forward(pk, tokens, pos, None, self.cfg)
    np.testing.assert_allclose(np.asarray(logits_packed), np.asarray(logits_fake), rtol=1e-5, atol=1e-5)
    self.assertLess(packed.layer_param_bytes(pk), packed.layer_param_bytes(fake) / 3)
    point = apply.measure_memory_point(pk, self.cfg, self.tokens, p)
    self.assertAlmostEqual(point["zero_fraction"], 0.5, delta=0.01)
    self.assertTrue(np.isfinite(point["perplexity"]))
    # A policy built for another model is refused.
    other = llama.init_params(self.cfg, jax.random.PRNGKey(5), std=0.2)
    with self.assertRaisesRegex(sensitivity.SensitivityMismatch, "built for model 'tiny'"):
      apply.apply_policy(other, self.cfg, p, self.tokens)

  def test_activation_bits_quantize_inputs(self):
    p = CompressionPolicy(sparsity=(0.0,) * 4, w_bits=(None,) * 4, a_bits=(8, 8, 4, 4))
    out = apply.apply_policy(self.params, self.cfg, p, self.tokens)
    self.assertEqual([seg["wq"].a_bits for seg in out["layers"]], [8, 4])
    tokens = jnp.asarray(self.tokens)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    a, _ = llama.forward(out, tokens, pos, None, self.cfg)
    b, _ = llama.forward(self.params, tokens, pos, None, self.cfg)
    self.assertGreater(float(jnp.abs(a - b).max()), 0)             # activations were quantized
    self.assertTrue(bool(jnp.all(jnp.isfinite(a))))


if __name__ == "__main__":
  absltest.main()
