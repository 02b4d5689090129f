"""KVMerger policy: parity with a plain numpy statement of the method, its invariants, generation.

The numpy oracle below restates the method (arXiv 2407.08454, as `lacax.cache.kvmerger` reads it) with loops:
protection, the backward scan that grows a set while neighbours are similar (closing it at `max_run` members),
exact budgets by adding the most similar pairs one at a time, pivot, Gaussian weights and the merged key/value.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from lacax import generate as generate_lib
from lacax.cache.kvmerger import KVMergerPolicy
from lacax.cache.full import FullPolicy
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.sampling import SamplingConfig

# head_dim 16, 3 layers, 2 kv heads.
_CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2)
_SLOTS = 24
_ROW_LENGTHS = (24, 17)


def _random_cache(policy, seed=0, continue_prob=0.6):
  """A prefilled cache with planted runs of similar keys (random scores, values, row 1 shorter)."""
  rng = np.random.default_rng(seed)
  cache = policy.init(_CFG, len(_ROW_LENGTHS), _SLOTS)
  num_layers, batch, slots, kv_heads, head_dim = cache.k.shape
  # Weak high-frequency RoPE pairs (0 and 1), so that planted runs stay similar after rotation too.
  amp = np.ones(head_dim, np.float32)
  amp[[0, 1, head_dim // 2, head_dim // 2 + 1]] = 0.2
  k = rng.normal(size=cache.k.shape).astype(np.float32) * amp
  for s in range(1, slots):
    cont = rng.random((num_layers, batch, 1, kv_heads, 1)) < continue_prob
    k[:, :, s:s + 1] = np.where(cont, k[:, :, s - 1:s] + 0.15 * rng.normal(size=(num_layers, batch, 1, kv_heads,
                                                                                     head_dim)) * amp, k[:, :, s:s + 1])
  v = rng.normal(size=cache.v.shape).astype(np.float32)
  pos = np.broadcast_to(np.arange(slots)[None, None, :, None], cache.pos.shape).copy()
  for b, n in enumerate(_ROW_LENGTHS):
    pos[:, b, n:] = -1
    k[:, b, n:] = 0
    v[:, b, n:] = 0
  scores = rng.random(cache.scores.shape).astype(np.float32) * (pos >= 0)
  length = np.broadcast_to(np.array(_ROW_LENGTHS, np.int32)[None], (num_layers, batch))
  return cache.replace(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos, jnp.int32),
                       scores=jnp.asarray(scores), length=jnp.asarray(length))


@functools.lru_cache(maxsize=None)
def _jitted(policy):
  """One compiled (plan, compact) pair per policy (policies are hashable static configs); the merged cache as
  merged (`lean_decode=False`: keys pre-RoPE, scores kept), which is what these tests inspect."""
  policy = dataclasses.replace(policy, lean_decode=False)
  return jax.jit(lambda cache: (policy.plan(cache), policy.compact(cache, capacity=cache.capacity)))


# --------------------------------------------------------------------------------------------------------
# The numpy oracle.
# --------------------------------------------------------------------------------------------------------


def _np_rotate(x, position, inv_freq):
  half = x.shape[-1] // 2
  angles = position * inv_freq.astype(np.float64)
  cos = np.concatenate([np.cos(angles)] * 2)
  sin = np.concatenate([np.sin(angles)] * 2)
  return x * cos + np.concatenate([-x[half:], x[:half]]) * sin


def _np_amount(amount, seen):
  if isinstance(amount, float):
    return int(np.ceil(np.float32(amount) * np.float32(seen)))
  return amount


def _np_cos(a, b):
  return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))


def _backward_scan(valid, linked, max_run):
  """Sets as ascending slot lists: token s joins the set of s + 1 when linked and the set is not full."""
  sets, cur = [], []
  for s in reversed(valid):
    if cur and cur[-1] == s + 1 and s in linked and len(cur) < max_run:
      cur.append(s)
    else:
      if cur:
        sets.append(cur)
      cur = [s]
  if cur:
    sets.append(cur)
  return [sorted(c) for c in reversed(sets)]


def numpy_kvmerger(cache, policy):
  """Expected (k, v, pos, scores) per (layer, row, kv head) as lists of output slots, plus the sets."""
  k, v, pos, scores = (np.asarray(x, np.float64) for x in (cache.k, cache.v, cache.pos, cache.scores))
  pos = pos.astype(np.int64)
  inv_freq = np.asarray(cache.state.inv_freq)
  num_layers, batch, slots, kv_heads, _ = k.shape
  skipped = {i % num_layers for i in policy.skip_layers}
  expected, all_sets = {}, {}
  for l in range(num_layers):
    for b in range(batch):
      seen = int(pos[:, b].max()) + 1
      groups = [list(range(kv_heads))] if policy.granularity == "layer" else [[h] for h in range(kv_heads)]
      for heads in groups:
        valid = [s for s in range(slots) if all(pos[l, b, s, h] >= 0 for h in heads)]
        n = len(valid)

        def sim_key(h, s):
          if policy.similarity_on == "rope":
            return _np_rotate(k[l, b, s, h], pos[l, b, s, h], inv_freq)
          return k[l, b, s, h]

        def sim(s):
          return np.mean([_np_cos(sim_key(h, s), sim_key(h, s + 1)) for h in heads])

        def score(s):
          return np.mean([scores[l, b, s, h] for h in heads])

        num_recent = _np_amount(policy.recent, seen)
        recent = set(valid[max(n - num_recent, 0):]) if num_recent else set()
        candidates = [s for s in valid if s not in recent]
        top = set(sorted(candidates, key=lambda s: (-score(s), s))[:_np_amount(policy.protected_top, seen)])
        protected = recent | top
        active = l not in skipped
        if policy.budget is not None:
          active = active and n > _np_amount(policy.budget, seen)
        mergeable = lambda s: s in valid and s not in protected  # noqa: E731
        pairs = [s for s in valid if active and mergeable(s) and mergeable(s + 1)]
        if policy.exact_budget:
          target = min(n, _np_amount(policy.budget, seen))
          ordered = sorted(pairs, key=lambda s: (-sim(s), s))
          for count in range(len(ordered) + 1):  # add the most similar pairs one at a time
            sets = _backward_scan(valid, set(ordered[:count]), policy.max_run)
            if len(sets) <= target:
              break
        else:
          sets = _backward_scan(valid, {s for s in pairs if sim(s) > policy.eps}, policy.max_run)

        for h in heads:
          all_sets[l, b, h] = (sets, protected)
          outs = []
          for members in sets:
            pivot = max(members, key=lambda s: (scores[l, b, s, h], -s))
            dist = [np.linalg.norm(sim_key(h, pivot) - sim_key(h, s)) for s in members]
            if policy.sigma == "mean_distance":
              others = [d for s, d in zip(members, dist) if s != pivot]
              sigma = max(np.mean(others), 1e-6) if others else 1.0
            else:
              sigma = policy.sigma
            g = np.array([math.exp(-d * d / (2 * sigma * sigma)) for d in dist])
            w = g / g.sum()
            keys = [_np_rotate(k[l, b, s, h], pos[l, b, s, h] - pos[l, b, pivot, h], inv_freq)
                    if policy.merge_keys_on == "rope" else k[l, b, s, h] for s in members]
            key = sum(wi * ki for wi, ki in zip(w, keys))
            value = sum(wi * v[l, b, s, h] for wi, s in zip(w, members))
            if policy.value_scale_by_size:
              value = len(members) * value
            outs.append((key, value, pos[l, b, pivot, h], sum(scores[l, b, s, h] for s in members), w, pivot))
          expected[l, b, h] = outs
  return expected, all_sets


# --------------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------------

_EXACT_CASES = {
    "exact_int": dict(recent=1, protected_top=2, budget=9, exact_budget=True, max_run=6, skip_layers=(-1,)),
    "exact_fraction_layer": dict(recent=2, protected_top=1, budget=0.5, exact_budget=True, max_run=4,
                                 granularity="layer", skip_layers=(-1,)),
    "exact_fraction_split_runs": dict(recent=1, protected_top=1, budget=0.6, exact_budget=True, max_run=3,
                                      skip_layers=(-1,)),
}
_CASES = {
    "defaults_rope": dict(eps=0.75, recent=2, protected_top=2, max_run=4, skip_layers=(0,)),
    "raw_unscaled_mean_distance": dict(eps=0.7, recent=1, protected_top=3, max_run=16, similarity_on="raw",
                                       merge_keys_on="raw", value_scale_by_size=False, sigma="mean_distance",
                                       skip_layers=()),
    "layer_granularity": dict(eps=0.6, recent=2, protected_top=1, max_run=5, granularity="layer",
                              merge_keys_on="raw", skip_layers=(-1,)),
    "fractions_and_trigger": dict(eps=0.7, recent=0.1, protected_top=0.1, budget=20, max_run=3, sigma=2.0,
                                  skip_layers=()),
    "exact_unreachable": dict(recent=2, protected_top=2, budget=4, exact_budget=True, max_run=2, skip_layers=()),
    **_EXACT_CASES,
}


class KVMergerTest(parameterized.TestCase):

  @parameterized.named_parameters(*((name, name) for name in _CASES))
  def test_matches_numpy_oracle(self, case):
    policy = KVMergerPolicy(**_CASES[case])
    cache = _random_cache(policy)
    plan, out = _jitted(policy)(cache)
    expected, _ = numpy_kvmerger(cache, policy)
    merged_sets = 0
    for (l, b, h), outs in expected.items():
      n = len(outs)
      merged_sets += sum(len(o[4]) > 1 for o in outs)
      np.testing.assert_allclose(np.asarray(out.k[l, b, :n, h]), np.stack([o[0] for o in outs]), rtol=1e-5,
                                 atol=1e-5, err_msg=f"keys of layer {l} row {b} head {h}")
      np.testing.assert_allclose(np.asarray(out.v[l, b, :n, h]), np.stack([o[1] for o in outs]), rtol=1e-5,
                                 atol=1e-5, err_msg=f"values of layer {l} row {b} head {h}")
      np.testing.assert_array_equal(np.asarray(out.pos[l, b, :, h]), [o[2] for o in outs] + [-1] * (_SLOTS - n))
      np.testing.assert_allclose(np.asarray(out.scores[l, b, :n, h]), [o[3] for o in outs], rtol=1e-5)
      np.testing.assert_array_equal(np.asarray(out.k[l, b, n:, h]), 0.0)
      # The plan's weights and pivots are the oracle's.
      for o, (*_, w, pivot) in enumerate(outs):
        first, size = int(plan.start[l, b, o, h]), int(plan.run_len[l, b, o, h])
        self.assertLen(w, size)
        np.testing.assert_allclose(np.asarray(plan.key_weight[l, b, first:first + size, h]), w, rtol=1e-5)
        self.assertEqual(int(plan.pivot[l, b, first, h]), pivot)
    lengths = {(l, b): max(len(expected[l, b, h]) for h in range(_CFG.num_kv_heads))
               for l in range(_CFG.num_layers) for b in range(len(_ROW_LENGTHS))}
    np.testing.assert_array_equal(np.asarray(out.length), [[lengths[l, b] for b in range(len(_ROW_LENGTHS))]
                                                           for l in range(_CFG.num_layers)])
    self.assertGreater(merged_sets, 5, "the planted runs should produce merges")

  @parameterized.parameters("defaults_rope", "raw_unscaled_mean_distance")
  def test_weights_pivot_and_value_scale(self, case):
    policy = KVMergerPolicy(**_CASES[case])
    cache = _random_cache(policy, seed=1)
    plan, _ = _jitted(policy)(cache)
    start, run_len, kw, vw, pivot = (np.asarray(x) for x in (plan.start, plan.run_len, plan.key_weight,
                                                             plan.value_weight, plan.pivot))
    scores = np.asarray(cache.scores)
    num_multi = 0
    for idx in np.ndindex(plan.num_out.shape):
      l, b, h = idx
      for o in range(plan.num_out[idx]):
        members = np.arange(start[l, b, o, h], start[l, b, o, h] + run_len[l, b, o, h])
        w = kw[l, b, members, h]
        self.assertAlmostEqual(float(w.sum()), 1.0, places=5)
        p = pivot[l, b, members[0], h]
        self.assertTrue(np.all(pivot[l, b, members, h] == p))
        self.assertEqual(p, members[np.argmax(scores[l, b, members, h])], "pivot = largest accumulated score")
        self.assertEqual(w.max(), kw[l, b, p, h], "the pivot has the largest weight")
        if len(members) > 1:
          self.assertLess(w.min(), w.max(), "non-pivot members are down-weighted")
        scale = len(members) if policy.value_scale_by_size else 1
        np.testing.assert_allclose(vw[l, b, members, h], scale * w, rtol=1e-6)
        num_multi += len(members) > 1
    self.assertGreater(num_multi, 5)

  @parameterized.named_parameters(
      dict(testcase_name="counts", recent=3, protected_top=4),
      dict(testcase_name="fractions_layer", recent=0.125, protected_top=0.2, granularity="layer"),
  )
  def test_sets_are_runs_that_never_cross_protected_tokens(self, recent, protected_top, granularity="kv_head"):
    policy = KVMergerPolicy(eps=0.0, recent=recent, protected_top=protected_top, skip_layers=(),
                            granularity=granularity, max_run=8)
    cache = _random_cache(policy, seed=2)
    plan, out = _jitted(policy)(cache)
    start, run_len, protected = np.asarray(plan.start), np.asarray(plan.run_len), np.asarray(plan.protected)
    pos, out_pos = np.asarray(cache.pos), np.asarray(out.pos)
    scores = np.asarray(cache.scores).mean(-1, keepdims=True) if granularity == "layer" else np.asarray(cache.scores)
    for idx in np.ndindex(plan.num_out.shape):
      l, b, h = idx
      hs = 0 if granularity == "layer" else h
      n_valid = int((pos[l, b, :, h] >= 0).sum())
      num_recent = recent if isinstance(recent, int) else math.ceil(recent * n_valid)
      num_top = protected_top if isinstance(protected_top, int) else math.ceil(protected_top * n_valid)
      prot = np.flatnonzero(protected[l, b, :, h])
      self.assertLen(prot, num_recent + num_top)
      self.assertTrue(set(range(n_valid - num_recent, n_valid)) <= set(prot.tolist()), "recent tokens protected")
      # The other protected tokens are the best-scored non-recent ones.
      others = np.setdiff1d(np.arange(n_valid - num_recent), prot)
      self.assertGreater(scores[l, b, prot[prot < n_valid - num_recent], hs].min(), scores[l, b, others, hs].max())
      covered = []
      for o in range(plan.num_out[idx]):
        members = list(range(start[l, b, o, h], start[l, b, o, h] + run_len[l, b, o, h]))
        covered += members
        np.testing.assert_array_equal(pos[l, b, members, h], pos[l, b, members[0], h] + np.arange(len(members)))
        if len(members) > 1:
          self.assertFalse(protected[l, b, members, h].any(), f"set {members} holds a protected token")
        elif protected[l, b, members[0], h]:  # kept unmerged, bit for bit
          s = members[0]
          np.testing.assert_array_equal(out.k[l, b, o, h], cache.k[l, b, s, h])
          np.testing.assert_array_equal(out.v[l, b, o, h], cache.v[l, b, s, h])
          self.assertEqual(out_pos[l, b, o, h], pos[l, b, s, h])
      self.assertEqual(covered, list(range(n_valid)), "the runs partition the valid tokens in time order")
    self.assertLess(int(out.length.max()), _SLOTS - 6, "eps=0 merges every unprotected neighbourhood")

  @parameterized.parameters(*_EXACT_CASES)
  def test_exact_budget_hits_every_layer_and_head(self, case):
    options = _EXACT_CASES[case]
    policy = KVMergerPolicy(**options)
    budget = options["budget"]
    for seed in range(3):
      cache = _random_cache(policy, seed=seed, continue_prob=0.3)
      _, out = _jitted(policy)(cache)
      counts = np.asarray(jnp.sum(out.pos >= 0, axis=2))  # [L, B, KV]
      for b, n in enumerate(_ROW_LENGTHS):
        target = budget if isinstance(budget, int) else math.ceil(budget * n)
        np.testing.assert_array_equal(counts[:-1, b], min(n, target), err_msg=f"seed {seed} row {b}")
        np.testing.assert_array_equal(counts[-1, b], n, err_msg="skipped layer must keep every token")
        np.testing.assert_array_equal(np.asarray(out.length[:-1, b]), min(n, target))

  def test_prefill_only_and_decode_merging(self):
    prefill_only = KVMergerPolicy(eps=0.0, recent=1, protected_top=1, skip_layers=())
    cache = _random_cache(prefill_only)
    self.assertIs(prefill_only.compact(cache), cache, "a decode-step call (no capacity) is a no-op")

    decoding = KVMergerPolicy(recent=1, protected_top=1, budget=12, exact_budget=True, during_decode=True,
                              skip_layers=())
    compact = jax.jit(decoding.compact, static_argnames="capacity")
    merged = compact(_random_cache(decoding), capacity=_SLOTS)
    np.testing.assert_array_equal(merged.length, 12)
    # Append one token per row at the cursor (as the forward does); the decode-step call merges back.
    new_pos = np.broadcast_to(np.array(_ROW_LENGTHS)[None, :, None], (_CFG.num_layers, 2, _CFG.num_kv_heads))
    grown = merged.replace(pos=merged.pos.at[:, :, 12].set(new_pos), k=merged.k.at[:, :, 12].set(1.0),
                           length=merged.length + 1)
    again = compact(grown)
    np.testing.assert_array_equal(jnp.sum(again.pos >= 0, axis=2), 12)
    np.testing.assert_array_equal(again.pos[:, :, 11], new_pos, err_msg="the new token stays (recent)")
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(compact(again))):
      np.testing.assert_array_equal(a, b)  # at the budget: nothing to merge

  def test_eps_above_one_keeps_everything_bitwise(self):
    policy = KVMergerPolicy(eps=1.01, recent=0, protected_top=0, skip_layers=())
    cache = _random_cache(policy)
    _, out = _jitted(policy)(cache)
    for name in ("k", "v", "pos", "scores", "length"):
      np.testing.assert_array_equal(getattr(out, name), getattr(cache, name), err_msg=name)

  @parameterized.named_parameters(
      dict(testcase_name="exact_needs_budget", options=dict(exact_budget=True), field="exact_budget"),
      dict(testcase_name="decode_needs_budget", options=dict(during_decode=True), field="during_decode"),
      dict(testcase_name="fraction_range", options=dict(recent=1.5), field="recent"),
      dict(testcase_name="negative_count", options=dict(protected_top=-1), field="protected_top"),
      dict(testcase_name="bool_budget", options=dict(budget=True), field="budget"),
      dict(testcase_name="sigma", options=dict(sigma=0.0), field="sigma"),
      dict(testcase_name="sigma_rule", options=dict(sigma="rms"), field="sigma"),
      dict(testcase_name="space", options=dict(similarity_on="post"), field="similarity_on"),
      dict(testcase_name="granularity", options=dict(granularity="head"), field="granularity"),
      dict(testcase_name="max_run", options=dict(max_run=0), field="max_run"),
      dict(testcase_name="score_mode", options=dict(score_mode=None), field="score_mode"),
  )
  def test_invalid_options_name_the_field(self, options, field):
    with self.assertRaisesRegex(ValueError, field):
      KVMergerPolicy(**options)

  def test_skip_layers_out_of_range(self):
    policy = KVMergerPolicy(skip_layers=(5,))
    with self.assertRaisesRegex(ValueError, "skip_layers"):
      policy.compact(_random_cache(policy), capacity=_SLOTS)


class KVMergerGenerateTest(absltest.TestCase):
  """End to end through `lacax.generate` on a tiny random model (4 layers: the default skips 0, 1 and 3)."""

  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                    num_kv_heads=2, name="tiny")
  prompts = [list(range(3, 24)), [5, 9, 2, 7, 11, 4, 8, 13, 21, 6, 17, 3, 30, 44]]

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # An RBG key: threefry's per-shape compilation would dominate this test's run time on CPU.
    cls.params = jax.jit(functools.partial(llama.init_params, cls.cfg, std=0.2))(jax.random.key(0, impl="rbg"))

  def test_no_merging_equals_full_cache(self):
    full = generate_lib.generate(self.params, self.cfg, self.prompts, max_new_tokens=6, policy=FullPolicy())
    merged = generate_lib.generate(self.params, self.cfg, self.prompts, max_new_tokens=6,
                                   policy=KVMergerPolicy(eps=1.5))
    self.assertEqual(merged.tokens, full.tokens)
    self.assertEqual([len(t) for t in merged.tokens], [6, 6])

  def test_exact_budget_through_prefill_and_decode(self):
    policy = KVMergerPolicy(budget=8, exact_budget=True, during_decode=True, recent=2, protected_top=1)
    tokens, lengths = generate_lib.pad_prompts(self.prompts, bucket=32)
    max_new = 5
    statics = dict(cfg=self.cfg, policy=policy, sampling=SamplingConfig(), max_new_tokens=max_new, stop_ids=())
    capacity = policy.decode_capacity(self.cfg, int(lengths.max()) + max_new)
    state = generate_lib.prefill(self.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                                 decode_capacity=capacity, **statics)
    counts = np.asarray(jnp.sum(state.cache.pos >= 0, axis=2))  # [L, B, KV]
    np.testing.assert_array_equal(counts[2], 8, err_msg="merged layer holds the budget")
    for layer in (0, 1, 3):
      np.testing.assert_array_equal(counts[layer], np.repeat(lengths[:, None], 2, 1), err_msg=f"skipped layer {layer}")
    state = generate_lib.decode(self.params, state, **statics)
    counts = np.asarray(jnp.sum(state.cache.pos >= 0, axis=2))
    np.testing.assert_array_equal(counts[2], 8, err_msg="decode steps merge back to the budget")
    np.testing.assert_array_equal(counts[0], np.repeat(lengths[:, None], 2, 1) + max_new - 1)
    out = np.asarray(state.out)
    self.assertTrue(((out >= 0) & (out < self.cfg.vocab_size)).all())
    # The newest tokens stay (protected recent), at their original positions.
    np.testing.assert_array_equal(state.cache.pos[2, :, 7], np.repeat(lengths[:, None], 2, 1) + max_new - 2)


if __name__ == "__main__":
  absltest.main()
