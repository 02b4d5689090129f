"""The kvpress scorer policies (Knorm, Random, KeyDiff, LagKV, CUR, LeverageScore, QFilter) against plain NumPy.

Each method's defining property is restated in NumPy from the kvpress `score()` it reproduces (cited in the
method modules) and checked on random keys and values: the positions each (layer, row, KV head) keeps after the
prefill hand-off equal the top-`budget` of the NumPy scores (ties: none on random floats), the budget is met
exactly, rows of different lengths are planned independently, and decode-time eviction does the same at every
call. The registry-level invariants (sharded == unsharded, never compacting == full) are in
tests/test_cache_contract.py and tests/test_sharding.py.
"""

from __future__ import annotations

import os
import tempfile

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax import errors
from lacax.cache import cur, expected_attention, keydiff, knorm, lagkv, leverage, plans, qfilter, random_policy
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.model import rope as rope_lib
from tests.cache_policies import kept_positions, top_budget

CFG = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8)
SLOTS = 24
LENGTHS = (22, 13)  # row 1 is right-padded
BUDGET = 10
INV_FREQ = rope_lib.inv_frequencies(CFG)


def np_rope(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
  """x [..., D] rotated at pos [...] (rotate-half RoPE, as Hugging Face)."""
  angles = pos[..., None].astype(np.float64) * INV_FREQ.astype(np.float64)
  cos, sin = np.concatenate([np.cos(angles)] * 2, -1), np.concatenate([np.sin(angles)] * 2, -1)
  half = x.shape[-1] // 2
  return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def random_kv(seed: int = 0):
  """Pre-RoPE keys and values [L, B, S, KV, D] float32 (with per-channel offsets, as real keys have)."""
  rng = np.random.RandomState(seed)
  shape = (CFG.num_layers, len(LENGTHS), SLOTS, CFG.num_kv_heads, CFG.head_dim)
  keys = rng.randn(*shape) + rng.randn(CFG.num_layers, 1, 1, CFG.num_kv_heads, CFG.head_dim)
  return keys.astype(np.float32), rng.randn(*shape).astype(np.float32)


def filled_cache(policy, keys, values):
  """A cache built by the policy holding LENGTHS tokens (positions 0..n-1) of the given pre-RoPE keys."""
  cache = policy.init(CFG, len(LENGTHS), SLOTS)
  slot = np.arange(SLOTS)[None, :, None]
  pos = np.where(slot < np.asarray(LENGTHS)[:, None, None], slot, -1)
  pos = np.broadcast_to(pos[None], cache.pos.shape).astype(np.int32)
  valid = (pos >= 0)[..., None]
  k = keys if policy.rope_mode != "stored" else np_rope(keys, np.maximum(pos, 0)).astype(np.float32)
  return cache.replace(k=jnp.asarray(np.where(valid, k, 0)), v=jnp.asarray(np.where(valid, values, 0)),
                       pos=jnp.asarray(pos),
                       length=jnp.asarray(np.broadcast_to(np.asarray(LENGTHS, np.int32), cache.length.shape)))


# ----------------------------------------------------------------------------------------------------------------
# The NumPy statements, per (layer, row, kv head) sequence of n tokens: keys / values [n, D] -> scores [n].
# ----------------------------------------------------------------------------------------------------------------


def np_knorm(k, v):
  del v
  return -np.linalg.norm(k, axis=-1)


def np_keydiff(k, v):
  del v
  unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
  anchor = unit.mean(0)
  return -(k @ anchor) / (np.linalg.norm(k, axis=-1) * np.linalg.norm(anchor))


def np_lagkv(k, v, n_sink, lag):
  n = len(k)
  if n < n_sink + 2 * lag:
    score = np.ones(n)
    score[n_sink:] = np.arange(n - n_sink) / (n - n_sink)
    return score
  end = n_sink + (n - n_sink) // lag * lag
  score = np.ones(n)
  for start in range(n_sink, end - lag, lag):
    parts = []
    for x in (k, v):
      cur_part, ref = x[start:start + lag], x[start + lag:start + 2 * lag]
      spread = ((cur_part - ref.min(0)) / (ref.max(0) - ref.min(0))).std(axis=-1, ddof=1)
      parts.append(np.exp(spread) / np.exp(spread).sum())
    mixed = (parts[0] + parts[1]) / 2
    score[start:start + lag] = np.argsort(np.argsort(mixed)) / lag
  return score


def np_cur(k, v, num_sinks=4, window=16):
  def local(x):
    out = np.empty_like(x)
    for s in range(0, len(x), window):
      out[s:s + window] = x[s:s + window] / x[s:s + window].sum()
    return out

  score = local((k**2).sum(-1)) * local((v**2).sum(-1))
  score = score / score.sum()
  score[:num_sinks] = 1.0
  return score


def np_leverage(k, sketch, jitter=1e-2):
  x = (k - k.mean(0)) @ sketch
  gram = x.T @ x + jitter * np.eye(x.shape[1])
  return np.maximum(np.einsum("sk,ks->s", x, np.linalg.solve(gram, x.T)), 0)


def np_expected_attention(k, v, mean, cov, n_future, n_sink, agg):
  """k (post-RoPE), v [n, D]; mean [G, D], cov [G, D, D] pre-RoPE query statistics of the group."""
  n, d = k.shape
  future = np.arange(n, n + n_future)
  # R_p e_j = rope(e_j, p): the mean of the rotation matrices over the future positions.
  rot = np.mean(np_rope(np.eye(d)[None], np.repeat(future[:, None], d, 1)), axis=0).T
  mu, sigma = mean @ rot.T, rot @ cov @ rot.T
  ks = k[n_sink:]
  z = ks @ mu.T / np.sqrt(d) + np.einsum("si,gij,sj->sg", ks, sigma, ks) / d / 2  # [n - n_sink, G]
  probs = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
  score = {"mean": np.mean, "max": np.max, "sum": np.sum}[agg](probs, axis=1) * np.linalg.norm(v[n_sink:], axis=-1)
  return np.concatenate([np.full(n_sink, score.max() + 1), score])


class ScorerPlansTest(parameterized.TestCase):

  def check_against_numpy(self, policy, np_score, *, key_space="pre_rope", budget=BUDGET, seed=0, np_score_at=None):
    keys, values = random_kv(seed)
    cache = filled_cache(policy, keys, values)
    out = jax.jit(lambda c: policy.compact(c, capacity=budget + 2))(cache)
    self.assertEqual(out.capacity, budget + 2)
    got = kept_positions(out)
    for (l, b, h), kept in got.items():
      n = LENGTHS[b]
      k = keys[l, b, :n, h].astype(np.float64)
      if key_space == "post_rope":
        k = np_rope(k, np.arange(n))
      v = values[l, b, :n, h].astype(np.float64)
      want = top_budget(np_score(k, v) if np_score_at is None else np_score_at(l, b, h, k, v), budget)
      self.assertEqual(kept, want, f"{type(policy).__name__} layer {l} row {b} head {h}")
      self.assertLen(kept, min(n, budget))
    return got

  @parameterized.named_parameters(("original", "original"), ("stored", "stored"))
  def test_knorm_keeps_the_smallest_norms(self, rope_mode):
    self.check_against_numpy(knorm.KnormPolicy(BUDGET, rope_mode=rope_mode), np_knorm)

  @parameterized.named_parameters(("post_rope", "post_rope"), ("pre_rope", "pre_rope"))
  def test_keydiff_keeps_the_keys_least_like_the_mean_direction(self, key_space):
    self.check_against_numpy(keydiff.KeyDiffPolicy(BUDGET, key_space=key_space), np_keydiff, key_space=key_space)

  def test_keydiff_post_rope_from_a_stored_cache(self):
    policy = keydiff.KeyDiffPolicy(BUDGET, rope_mode="stored")
    self.check_against_numpy(policy, np_keydiff, key_space="post_rope")

  def test_lagkv_scores_partitions_against_the_next(self):
    # Row 0 (22 tokens >= 2 + 2 * 4) is scored by partitions; row 1 (13 tokens; lag 6: 13 < 2 + 12) takes the
    # short branch: sinks + the most recent.
    for lag in (4, 6):
      policy = lagkv.LagKVPolicy(BUDGET, n_sink=2, lag_size=lag)
      got = self.check_against_numpy(policy, lambda k, v, lag=lag: np_lagkv(k, v, 2, lag), key_space="post_rope")
      if lag == 6:
        self.assertEqual(got[(0, 1, 0)], [0, 1] + list(range(13 - BUDGET + 2, 13)))

  def test_cur_keeps_the_largest_local_kv_leverage(self):
    policy = cur.CURPolicy(BUDGET, local_window_size=5)
    self.check_against_numpy(policy, lambda k, v: np_cur(k, v, 4, 5))

  @parameterized.named_parameters(("original", "original"), ("stored", "stored"))
  def test_leverage_keeps_the_largest_sketched_leverage(self, rope_mode):
    policy = leverage.LeverageScorePolicy(BUDGET, sketch_dimension=6, seed=3, rope_mode=rope_mode)
    shape = (CFG.num_layers, len(LENGTHS), CFG.num_kv_heads)
    sketch = np.asarray(leverage.gaussian_sketch(jax.random.PRNGKey(3), shape, CFG.head_dim, 6), np.float64)
    keys, values = random_kv(0)
    cache = filled_cache(policy, keys, values)
    got = kept_positions(jax.jit(lambda c: policy.compact(c, capacity=BUDGET))(cache))
    for (l, b, h), kept in got.items():
      n = LENGTHS[b]
      self.assertEqual(kept, top_budget(np_leverage(keys[l, b, :n, h].astype(np.float64), sketch[l, b, h]), BUDGET))
    # The z-scores are normalised per row over heads and held tokens: mean 0, unbiased std 1.
    z = np.asarray(policy.score(cache))
    for b, n in enumerate(LENGTHS):
      held = z[:, b, :n].reshape(CFG.num_layers, -1)
      np.testing.assert_allclose(held.mean(-1), 0, atol=1e-5)
      np.testing.assert_allclose(held.std(-1, ddof=1), 1, rtol=1e-4)

  def test_leverage_linear_algebra_is_plain_jax(self):
    rng = np.random.RandomState(0)
    a = rng.randn(3, 2, 6, 6)
    a = a @ np.swapaxes(a, -1, -2) + np.eye(6)
    low = np.asarray(leverage.cholesky(jnp.asarray(a, jnp.float32)))
    np.testing.assert_allclose(low, np.linalg.cholesky(a), atol=1e-5)
    b = rng.randn(3, 2, 6, 5)
    np.testing.assert_allclose(np.asarray(leverage.forward_substitute(jnp.asarray(low), jnp.asarray(b, jnp.float32))),
                               np.linalg.solve(np.linalg.cholesky(a), b), atol=1e-4)

  def test_qfilter_keeps_the_largest_projection_on_the_query_direction(self):
    filters = np.random.RandomState(5).randn(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "f.npz")
      qfilter.save(path, filters)
      policy = qfilter.QFilterPolicy(BUDGET, filters_path=path)
      keys, values = random_kv(0)
      got = kept_positions(jax.jit(lambda c: policy.compact(c, capacity=BUDGET))(filled_cache(policy, keys, values)))
    for (l, b, h), kept in got.items():
      k = np_rope(keys[l, b, :LENGTHS[b], h].astype(np.float64), np.arange(LENGTHS[b]))
      self.assertEqual(kept, top_budget(-(k @ filters[l, h]), BUDGET))

  @parameterized.named_parameters(("mean", "mean"), ("max", "max"))
  def test_expected_attention_keeps_the_largest_expected_attention(self, agg):
    rng = np.random.RandomState(7)
    mean = rng.randn(CFG.num_layers, CFG.num_heads, CFG.head_dim)
    factor = rng.randn(CFG.num_layers, CFG.num_heads, CFG.head_dim, CFG.head_dim) / 3
    cov = factor @ np.swapaxes(factor, -1, -2)
    group = CFG.num_heads // CFG.num_kv_heads
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "stats.npz")
      expected_attention.save(path, mean, cov)
      policy = expected_attention.ExpectedAttentionPolicy(BUDGET, stats_path=path, n_future_positions=16,
                                                          n_sink=2, score_agg=agg)
      mean32, cov32 = expected_attention.load(path)
      self.check_against_numpy(policy, None, key_space="post_rope", np_score_at=lambda l, b, h, k, v: (
          np_expected_attention(k, v, mean32[l, h * group:(h + 1) * group].astype(np.float64),
                                cov32[l, h * group:(h + 1) * group].astype(np.float64), 16, 2, agg)))

  def test_expected_attention_statistics(self):
    queries = np.random.RandomState(0).randn(2, 30, 4, 8)
    mean, cov = expected_attention.statistics_from_queries(queries)
    np.testing.assert_allclose(mean[1, 2], queries[1, :, 2].mean(0), atol=1e-6)
    np.testing.assert_allclose(cov[1, 2], np.cov(queries[1, :, 2].T), atol=1e-5)  # N - 1, as kvpress
    params = llama.init_params(CFG, jax.random.PRNGKey(0), std=0.1)
    tokens = [[3, 9, 4, 1, 7, 2, 8], [5, 6, 2, 11, 12]]
    got_mean, got_cov = expected_attention.calibrate(params, CFG, tokens, n_sink=2, bucket=4)
    q = np.asarray(plans.model_queries(params, CFG, jnp.asarray([tokens[0], tokens[1] + [0, 0]]),
                                       jnp.asarray([7, 5]), rotated=False))
    real = np.concatenate([q[:, 0, 2:7], q[:, 1, 2:5]], axis=1)  # each text without its first n_sink tokens
    want_mean, want_cov = expected_attention.statistics_from_queries(real)
    np.testing.assert_allclose(got_mean, want_mean, atol=1e-5)
    np.testing.assert_allclose(got_cov, want_cov, atol=1e-5)

  def test_random_is_seeded_uniform_and_per_head(self):
    keys, values = random_kv(0)
    runs = {}
    for seed in (0, 0, 1):
      policy = random_policy.RandomPolicy(BUDGET, seed=seed)
      cache = filled_cache(policy, keys, values)
      runs.setdefault(seed, []).append(kept_positions(policy.compact(cache, capacity=BUDGET)))
      # The kept set is the top-budget of the documented draw: uniform(fold_in(PRNGKey(seed), tokens seen)).
      draw = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(seed), max(LENGTHS)),
                                           cache.pos.shape))
      for (l, b, h), kept in runs[seed][-1].items():
        self.assertEqual(kept, top_budget(draw[l, b, :LENGTHS[b], h], BUDGET))
    self.assertEqual(runs[0][0], runs[0][1])
    self.assertNotEqual(runs[0][0], runs[1][0])
    kept = runs[0][0]
    self.assertNotEqual(kept[(0, 0, 0)], kept[(0, 0, 1)], "heads should draw independently")

  def test_decode_time_eviction_and_prefill_only_noop(self):
    keys, values = random_kv(1)
    prefill_only = knorm.KnormPolicy(BUDGET)
    cache = filled_cache(prefill_only, keys, values)
    self.assertIs(prefill_only.compact(cache), cache)  # a decode-step call of a prefill-time policy
    streaming = knorm.KnormPolicy(BUDGET, during_decode=True)
    self.assertTrue(streaming.compacts_in_decode)
    self.assertEqual(streaming.decode_capacity(CFG, 100), BUDGET + 1)
    self.assertEqual(knorm.KnormPolicy(BUDGET, max_new_tokens=5).decode_capacity(CFG, 100), BUDGET + 5)
    out = jax.jit(streaming.compact)(filled_cache(streaming, keys, values))
    self.assertEqual(out.capacity, SLOTS)
    for (l, b, h), kept in kept_positions(out).items():
      self.assertEqual(kept, top_budget(np_knorm(keys[l, b, :LENGTHS[b], h], None), BUDGET))
    np.testing.assert_array_equal(np.asarray(out.length), BUDGET)

  def test_scoring_keys_convert_between_key_spaces(self):
    keys, values = random_kv(2)
    for mode in ("original", "stored"):
      cache = filled_cache(knorm.KnormPolicy(BUDGET, rope_mode=mode), keys, values)
      pos = np.maximum(np.asarray(cache.pos), 0)
      valid = (np.asarray(cache.pos) >= 0)[..., None]
      for space, want in (("pre_rope", keys), ("post_rope", np_rope(keys, pos))):
        got = np.asarray(plans.scoring_keys(cache, space, jnp.asarray(INV_FREQ)))
        np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-5,
                                   err_msg=f"{mode} -> {space}")


class QFilterCalibrationTest(absltest.TestCase):

  def test_filters_come_from_the_groups_queries(self):
    rng = np.random.RandomState(0)
    direction = rng.randn(2, 3, 8)  # [L, KV, hd]: a shared query direction per group
    # [L, N, H, hd]: 6 query heads in 3 groups of 2, each the group's direction plus noise.
    queries = 2.0 * np.repeat(direction, 2, axis=1)[:, None] + 0.3 * rng.randn(2, 50, 6, 8)
    filters = qfilter.filters_from_queries(queries, num_kv_heads=3)
    for l in range(2):
      for h in range(3):
        stacked = queries[l, :, 2 * h:2 * h + 2].reshape(-1, 8)
        u = np.linalg.svd(stacked, full_matrices=False)[2][0]
        u = u if np.mean(stacked @ u) > 0 else -u
        np.testing.assert_allclose(filters[l, h], -u, atol=1e-5)
        self.assertGreater(np.mean(stacked @ -filters[l, h]), 0)
    # GQA: the second query head of a group moves that group's filter only.
    moved = queries.copy()
    moved[:, :, 1] = 5.0 * rng.randn(8)
    changed = qfilter.filters_from_queries(moved, num_kv_heads=3)
    self.assertGreater(np.abs(changed[:, 0] - filters[:, 0]).max(), 1e-2)
    np.testing.assert_allclose(changed[:, 1:], filters[:, 1:])

  def test_calibration_queries_are_the_models_and_the_file_round_trips(self):
    params = llama.init_params(CFG, jax.random.PRNGKey(0), std=0.1)
    tokens = [[3, 9, 4, 1, 7, 2, 8], [5, 6, 2]]
    q = np.asarray(plans.model_queries(params, CFG, jnp.asarray([tokens[0], tokens[1] + [0] * 4]),
                                             jnp.asarray([7, 3]), rotated=True))
    # Layer 0 sees the embeddings: its queries are rms_norm(embed) @ wq[0], rotated at the positions.
    x = np.asarray(params["embed"], np.float64)[tokens[0]]
    h = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + CFG.rms_norm_eps) * np.asarray(params["layers"]["attn_norm"][0])
    want = np_rope(np.einsum("td,dhk->thk", h, np.asarray(params["layers"]["wq"][0])), np.arange(7)[:, None])
    np.testing.assert_allclose(q[0, 0, :7], want, atol=1e-4)
    np.testing.assert_array_equal(q[:, 1, 3:], 0)  # padding
    filters = qfilter.calibrate(params, CFG, tokens, bucket=4)
    self.assertEqual(filters.shape, (CFG.num_layers, CFG.num_kv_heads, CFG.head_dim))
    real = np.concatenate([q[:, 0, :7], q[:, 1, :3]], axis=1)
    np.testing.assert_allclose(filters, qfilter.filters_from_queries(real, CFG.num_kv_heads), atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "smol.npz")
      qfilter.save(path, filters)
      np.testing.assert_array_equal(qfilter.load(path), filters)


class ValidationTest(absltest.TestCase):

  def test_bad_fields_are_named(self):
    with self.assertRaisesRegex(ValueError, r"LagKV lag_size=0 must be >= 1"):
      lagkv.LagKVPolicy(8, lag_size=0)
    with self.assertRaisesRegex(ValueError, r"CUR leverage_type='kv' must be one of"):
      cur.CURPolicy(8, leverage_type="kv")
    with self.assertRaisesRegex(ValueError, r"KeyDiff key_space='rope' must be one of"):
      keydiff.KeyDiffPolicy(8, key_space="rope")
    with self.assertRaisesRegex(ValueError, r"Knorm budget=0 must be >= 1"):
      knorm.KnormPolicy(0)
    with self.assertRaisesRegex(ValueError, r"Knorm during_decode=1 must be True or False"):
      knorm.KnormPolicy(4, during_decode=1)

  def test_qfilter_files_are_checked(self):
    keys, values = random_kv(0)
    with self.assertRaisesRegex(ValueError, r"QFilter filters_path is empty: compute filters"):
      policy = qfilter.QFilterPolicy(4)
      policy.compact(filled_cache(policy, keys, values), capacity=4)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "wrong.npz")
      qfilter.save(path, np.ones((3, 2, 8), np.float32))
      policy = qfilter.QFilterPolicy(4, filters_path=path)
      with self.assertRaisesRegex(errors.FileFormatError, r"filters of shape \(3, 2, 8\).*needs \(2, 2, 8\)"):
        policy.compact(filled_cache(policy, keys, values), capacity=4)
      bad = os.path.join(tmp, "bad.npz")
      with open(bad, "wb") as f:
        f.write(b"not a zip")
      with self.assertRaisesRegex(errors.FileFormatError, r"not a Q-Filter .npz file"):
        qfilter.load(bad)
    with self.assertRaisesRegex(errors.FileFormatError, r"does not exist"):
      qfilter.load(os.path.join(tmp, "gone.npz"))


if __name__ == "__main__":
  absltest.main()
