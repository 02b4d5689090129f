"""The policies on the forward's recorded statistics (CriticalKV, ThinK, SimLayerKV, ExpectedAttention's online
statistics) and the recording itself (`lacax.cache.kv_cache.StatsRecording`), against plain NumPy.

Every statistic and every kvpress definition is restated in NumPy from the model's own numbers (the residual
stream entering each layer, the weights, the cache's keys and values) and checked after a real prefill of a
tiny random GQA model (4 query heads on 2 kv heads): the recorded ||W_o v||_1, window queries and query moments;
the positions (or key channels) each (layer, row, kv head) keeps after the prefill hand-off; budgets met
exactly; rows of different lengths planned independently; a chunked prefill recording what the one-shot one
does; and a cache that records nothing running the forward of before, bit for bit. The registry-level
invariants (sharded == unsharded, never compacting == full) are in tests/test_cache_contract.py and
tests/test_sharding.py.
"""

from __future__ import annotations

import dataclasses
import functools

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache import plans, registry
from lacax.cache.composed import ComposedPolicy
from lacax.cache.criticalkv import CriticalKVPolicy
from lacax.cache.expected_attention import ExpectedAttentionPolicy
from lacax.cache.full import FullPolicy
from lacax.cache.knorm import KnormPolicy
from lacax.cache.kv_cache import StatsRecording, init_stats
from lacax.cache.simlayerkv import SimLayerKVPolicy
from lacax.cache.snapkv import SnapKVPolicy
from lacax.cache.think import ThinKPolicy
from lacax.cache.tova import TOVAPolicy
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.model import rope as rope_lib
from tests.cache_policies import kept_positions, top_budget

CFG = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8)
G = CFG.num_heads // CFG.num_kv_heads
LENGTHS = (22, 13)  # row 1 is right-padded
T = 24
SLOTS = 24
BUDGET = 10
INV_FREQ = np.asarray(rope_lib.inv_frequencies(CFG), np.float64)


@functools.lru_cache(maxsize=None)
def model():
  return llama.init_params(CFG, jax.random.PRNGKey(3), std=0.3)


def inputs():
  tokens = np.random.RandomState(0).randint(1, CFG.vocab_size, (len(LENGTHS), T)).astype(np.int32)
  t = np.arange(T)[None, :]
  positions = np.where(t < np.asarray(LENGTHS)[:, None], t, -1).astype(np.int32)
  return tokens, positions


_forward = jax.jit(llama.forward, static_argnames=("cfg",))


def prefill(cache, chunks: int = 1):
  """The prompts of `inputs()` prefilled into `cache` in one forward or in `chunks` (equal) forwards."""
  tokens, positions = inputs()
  logits = []
  for part in np.array_split(np.arange(T), chunks):
    out, cache = _forward(model(), jnp.asarray(tokens[:, part]), jnp.asarray(positions[:, part]), cache, CFG)
    logits.append(out)
  return jnp.concatenate(logits, axis=1), cache


def np_rope(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
  """x [..., D] rotated at pos [...] (rotate-half RoPE, as Hugging Face)."""
  angles = np.asarray(pos, np.float64)[..., None] * INV_FREQ
  cos, sin = np.concatenate([np.cos(angles)] * 2, -1), np.concatenate([np.sin(angles)] * 2, -1)
  half = x.shape[-1] // 2
  return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


@functools.lru_cache(maxsize=None)
def np_queries() -> np.ndarray:
  """[L, B, T, H, D] float64 pre-RoPE queries of every layer, restated from the residual stream entering it
  (kvpress's `get_prerope_query_states`: attention norm, then q_proj)."""
  tokens, positions = inputs()
  options = llama.ForwardOptions(hidden_layers=tuple(range(CFG.num_layers)), logits=False)
  hidden = np.asarray(llama.run(model(), jnp.asarray(tokens), jnp.asarray(positions), None, CFG,
                                options=options).hidden, np.float64)
  layers = jax.tree.map(lambda a: np.asarray(a, np.float64), model()["layers"])
  normed = hidden / np.sqrt(np.mean(hidden ** 2, -1, keepdims=True) + CFG.rms_norm_eps)
  normed = normed * layers["attn_norm"][:, None, None, :]
  return np.einsum("lbtd,ldhk->lbthk", normed, layers["wq"])


def post_rope_keys(cache) -> np.ndarray:
  """[L, B, S, KV, D] float64 keys rotated at their original positions, whatever the cache stores."""
  k, pos = np.asarray(cache.k, np.float64), np.asarray(cache.pos)
  return k if cache.rope_mode == "stored" else np_rope(k, np.maximum(pos, 0))


def handoff(policy, chunks: int = 1, capacity: int = SLOTS):
  """(cache after the prefill, cache after the prefill hand-off) of `policy`."""
  _, cache = prefill(policy.init(CFG, len(LENGTHS), SLOTS), chunks)
  return cache, jax.jit(lambda c: policy.compact(c, capacity=capacity))(cache)


# ----------------------------------------------------------------------------------------------------------------
# The recording.
# ----------------------------------------------------------------------------------------------------------------

ALL_STATS = StatsRecording(value_norm=True, window_q2=4, query_moments=2)


class RecordingTest(parameterized.TestCase):

  def test_forward_without_recordings_is_unchanged(self):
    """A cache that asks for nothing never reaches the recording code (its forward is the one of before, bit for
    bit); a recording cache computes the same logits and cache (up to XLA's fusion of the extra consumers)."""
    plain = FullPolicy(rope_mode="stored").init(CFG, len(LENGTHS), SLOTS)
    self.assertIsNone(plain.stats)

    def fail(*args, **kwargs):
      raise AssertionError("the forward recorded statistics for a cache that asks for none")

    original = llama._record_stats  # pylint: disable=protected-access
    llama._record_stats = fail  # pylint: disable=protected-access
    params, (tokens, positions) = model(), inputs()
    try:  # traced afresh: a prefill and a decode step (the CPU decode kernel's path)
      jax.eval_shape(lambda c: llama.forward(params, jnp.asarray(tokens), jnp.asarray(positions), c, CFG), plain)
      jax.eval_shape(lambda c: llama.forward(params, jnp.full((2, 1), 5, jnp.int32),
                                             jnp.asarray([[22], [13]], jnp.int32), c, CFG), plain)
    finally:
      llama._record_stats = original  # pylint: disable=protected-access
    logits_a, a = prefill(plain)
    self.assertIsNone(a.stats)
    logits_b, b = prefill(plain.replace(stats=init_stats(CFG, len(LENGTHS), SLOTS, ALL_STATS)))
    np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), rtol=1e-5, atol=1e-5)
    for field in ("k", "v"):
      np.testing.assert_allclose(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), rtol=1e-5,
                                 atol=1e-5, err_msg=field)
    for field in ("pos", "length"):
      np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), err_msg=field)

  @parameterized.named_parameters(("_one_shot", 1), ("_chunked", 2))
  def test_statistics_equal_numpy(self, chunks):
    cache = FullPolicy(rope_mode="stored").init(CFG, len(LENGTHS), SLOTS)
    _, cache = prefill(cache.replace(stats=init_stats(CFG, len(LENGTHS), SLOTS, ALL_STATS)), chunks)
    stats = jax.device_get(cache.stats)
    layers = jax.tree.map(lambda a: np.asarray(a, np.float64), model()["layers"])
    v = np.asarray(cache.v, np.float64)  # [L, B, S, KV, D]
    wo = layers["wo"].reshape(CFG.num_layers, CFG.num_kv_heads, G, CFG.head_dim, -1)
    want_norm = np.abs(np.einsum("lbskd,lkgde->lbskge", v, wo)).sum(-1).mean(-1)
    want_norm = np.where(np.asarray(cache.pos) >= 0, want_norm, 0.0)
    np.testing.assert_allclose(stats.value_norm, want_norm, rtol=1e-5, atol=1e-6)
    q = np_queries()
    for b, n in enumerate(LENGTHS):
      if chunks == 1:  # the window of the one forward: its last 4 real queries, rotated at their positions
        rows = np_rope(q[:, b, n - 4:n], np.arange(n - 4, n)[:, None])  # [L, 4, H, D]
        want_q2 = (rows ** 2).mean(1).reshape(CFG.num_layers, CFG.num_kv_heads, G, -1).mean(2)
        np.testing.assert_allclose(stats.window_q2[:, b], want_q2, rtol=1e-5, atol=1e-6)
      seen = q[:, b, 2:n]  # query_moments=2: positions >= 2, accumulated over every chunk
      np.testing.assert_allclose(stats.q_count[:, b], n - 2)
      np.testing.assert_allclose(stats.q_sum[:, b], seen.sum(1), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(stats.q_outer[:, b], np.einsum("lthi,lthj->lhij", seen, seen), rtol=1e-5, atol=1e-5)

  def test_value_norms_move_with_their_slots(self):
    policy = CriticalKVPolicy(KnormPolicy(BUDGET), BUDGET)
    before, after = handoff(policy)
    self.assertIsNone(after.stats)  # stripped after a prefill-only hand-off
    src = plans.topk_keep_plan(policy.keep_scores(before)[0], before.valid(), BUDGET, None, BUDGET + 2)
    moved = jax.jit(lambda c: plans.apply_plan(c, src, jnp.bool_(True), BUDGET + 2))(before)
    pos, vn = np.asarray(moved.pos), np.asarray(moved.stats.value_norm)
    old_pos, old_vn = np.asarray(before.pos), np.asarray(before.stats.value_norm)
    for (l, b, s, h) in zip(*np.nonzero(pos >= 0)):
      self.assertEqual(vn[l, b, s, h], old_vn[l, b, pos[l, b, s, h], h])

  def test_merge_rejects_two_windows(self):
    self.assertEqual(StatsRecording(value_norm=True).merge(StatsRecording(window_q2=4)),
                     StatsRecording(value_norm=True, window_q2=4))
    with self.assertRaisesRegex(ValueError, r"window_q2: two policies of one cache ask for 4 and 8"):
      StatsRecording(window_q2=4).merge(StatsRecording(window_q2=8))


# ----------------------------------------------------------------------------------------------------------------
# The policies against their kvpress definitions.
# ----------------------------------------------------------------------------------------------------------------


class CriticalKVTest(parameterized.TestCase):

  @parameterized.named_parameters(("_half", 0.5), ("_fifth", 0.2))
  def test_kept_positions_equal_numpy(self, ratio):
    policy = CriticalKVPolicy(KnormPolicy(BUDGET), BUDGET, first_stage_ratio=ratio)
    before, after = handoff(policy, capacity=BUDGET)
    self.assertEqual(after.capacity, BUDGET)
    k, v = np.asarray(before.k, np.float64), np.asarray(before.v, np.float64)
    layers = jax.tree.map(lambda a: np.asarray(a, np.float64), model()["layers"])
    wo = layers["wo"].reshape(CFG.num_layers, CFG.num_kv_heads, G, CFG.head_dim, -1)
    for (l, b, h), kept in kept_positions(after).items():
      n = LENGTHS[b]
      score = -np.linalg.norm(k[l, b, :n, h], axis=-1)  # KnormPress.score
      first = top_budget(score, int(BUDGET * ratio))  # stage 1
      vwl1 = np.abs(np.einsum("sd,gde->sge", v[l, b, :n, h], wo[l, h])).sum(-1).mean(-1)  # vwl1norm
      merged = (score + 1e-4) * vwl1  # stage 2
      merged[first] = np.inf
      self.assertEqual(kept, top_budget(merged, BUDGET), f"layer {l} row {b} kv head {h}")
      self.assertLen(kept, BUDGET)  # both rows are over the budget: exactly the budget

  def test_inner_protection_and_decode_time_eviction(self):
    """Over SnapKV its observation window is always kept; over TOVA (decode-time) every step evicts down to the
    budget, and the recorded norms stay those of the values their slots hold through every compaction."""
    policy = CriticalKVPolicy(SnapKVPolicy(capacity=BUDGET, window=4, kernel=3), BUDGET)
    _, after = handoff(policy, capacity=BUDGET)
    for (l, b, h), kept in kept_positions(after).items():
      self.assertLen(kept, BUDGET)
      self.assertContainsSubset(range(LENGTHS[b] - 4, LENGTHS[b]), kept, f"layer {l} row {b} kv head {h}")

    policy = CriticalKVPolicy(TOVAPolicy(BUDGET), BUDGET)
    self.assertTrue(policy.compacts_in_decode)
    tokens = jnp.asarray(inputs()[0])

    @jax.jit
    def stream(cache):
      def step(cache, t):
        _, cache = llama.forward(model(), tokens[:, t][:, None], jnp.full((2, 1), t, jnp.int32), cache, CFG)
        cache = policy.compact(cache)
        return cache, plans.occupancy(cache)
      return jax.lax.scan(step, cache, jnp.arange(T))

    cache, held = stream(policy.init(CFG, len(LENGTHS), BUDGET + 1))
    np.testing.assert_array_equal(np.asarray(held)[BUDGET:], BUDGET)
    layers = jax.tree.map(lambda a: np.asarray(a, np.float64), model()["layers"])
    wo = layers["wo"].reshape(CFG.num_layers, CFG.num_kv_heads, G, CFG.head_dim, -1)
    want = np.abs(np.einsum("lbskd,lkgde->lbskge", np.asarray(cache.v, np.float64), wo)).sum(-1).mean(-1)
    valid = np.asarray(cache.pos) >= 0
    np.testing.assert_allclose(np.asarray(cache.stats.value_norm)[valid], want[valid], rtol=1e-5, atol=1e-6)

  def test_needs_a_value_norm_recording(self):
    policy = CriticalKVPolicy(KnormPolicy(BUDGET), BUDGET)
    _, cache = prefill(KnormPolicy(BUDGET).init(CFG, len(LENGTHS), SLOTS))
    with self.assertRaisesRegex(ValueError, r"CriticalKV needs a cache recording value norms"):
      policy.compact(cache, capacity=BUDGET)


class ThinKTest(parameterized.TestCase):

  @parameterized.named_parameters(("_every_prompt", None), ("_over_budget", 15))
  def test_pruned_channels_equal_numpy(self, budget):
    policy = ThinKPolicy(key_channel_compression_ratio=0.5, window=4, budget=budget)
    before, after = handoff(policy)
    self.assertIsNone(after.stats)
    self.assertEqual(kept_positions(after), kept_positions(before))  # no token is evicted
    k = np.asarray(before.k, np.float64)  # "stored": post-RoPE
    got = np.asarray(after.k, np.float64)
    q = np_queries()
    for b, n in enumerate(LENGTHS):
      rows = np_rope(q[:, b, n - 4:n], np.arange(n - 4, n)[:, None])  # the window's post-RoPE queries
      q2 = (rows ** 2).mean(1).reshape(CFG.num_layers, CFG.num_kv_heads, G, -1).mean(2)  # [L, KV, D]
      k2 = (k[:, b, :n] ** 2).mean(1)  # [L, KV, D]
      for l in range(CFG.num_layers):
        for h in range(CFG.num_kv_heads):
          want = k[l, b, :n, h].copy()
          if budget is None or n > budget:
            pruned = np.argsort(q2[l, h] * k2[l, h], kind="stable")[:CFG.head_dim // 2]
            want[:, pruned] = 0.0
          np.testing.assert_array_equal(got[l, b, :n, h], want, err_msg=f"layer {l} row {b} kv head {h}")

  def test_after_snapkv_in_a_composition(self):
    """kvpress runs ThinK as ComposedPress([SnapKVPress, ThinKPress]): SnapKV's kept tokens, then ThinK's
    channels scored on those survivors' keys; the composed cache records both statistics."""
    snap = SnapKVPolicy(capacity=BUDGET, window=4, kernel=3, rope_mode="stored")
    policy = ComposedPolicy(snap, ThinKPolicy(window=4))
    self.assertEqual(policy.stats_recording, StatsRecording(window_q2=4))
    _, after = handoff(policy, capacity=BUDGET + 2)
    _, alone = handoff(snap, capacity=BUDGET + 2)
    self.assertEqual(kept_positions(after), kept_positions(alone))
    k, got = np.asarray(alone.k, np.float64), np.asarray(after.k, np.float64)
    q = np_queries()
    for b, n in enumerate(LENGTHS):
      rows = np_rope(q[:, b, n - 4:n], np.arange(n - 4, n)[:, None])
      q2 = (rows ** 2).mean(1).reshape(CFG.num_layers, CFG.num_kv_heads, G, -1).mean(2)
      k2 = (k[:, b, :BUDGET] ** 2).mean(1)  # the survivors' keys (every row kept BUDGET tokens)
      for l in range(CFG.num_layers):
        for h in range(CFG.num_kv_heads):
          want = k[l, b, :BUDGET, h].copy()
          want[:, np.argsort(q2[l, h] * k2[l, h], kind="stable")[:CFG.head_dim // 2]] = 0.0
          np.testing.assert_array_equal(got[l, b, :BUDGET, h], want, err_msg=f"layer {l} row {b} kv head {h}")

  def test_needs_post_rope_keys(self):
    with self.assertRaisesRegex(ValueError, r"ThinK rope_mode='original' must be 'stored'"):
      ThinKPolicy(rope_mode="original")


class SimLayerKVTest(parameterized.TestCase):

  @parameterized.named_parameters(("_last_query", 1), ("_two_queries", 2))
  def test_lazy_layers_and_kept_positions_equal_numpy(self, n_last):
    n_initial, n_recent = 2, 6
    _, cache = prefill(FullPolicy(rope_mode="stored").init(CFG, len(LENGTHS), SLOTS))
    k = post_rope_keys(cache)
    q = np_queries()
    mass = np.zeros((CFG.num_layers, len(LENGTHS)))
    for l in range(CFG.num_layers):
      for b, n in enumerate(LENGTHS):
        # SnapKVPress.compute_window_attention: the last n_last queries, causal, the window's own keys dropped.
        qs = np_rope(q[l, b, n - n_last:n], np.arange(n - n_last, n)[:, None])  # [W, H, D]
        keys = np.repeat(k[l, b, :n], G, axis=1)  # repeat_kv: [n, H, D]
        logits = np.einsum("whd,shd->hws", qs, keys) / np.sqrt(CFG.head_dim)
        logits = np.where(np.arange(n)[None, None, :] <= np.arange(n - n_last, n)[None, :, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        a = (probs / probs.sum(-1, keepdims=True))[..., :n - n_last].mean((0, 1))
        mass[l, b] = a[:n_initial].sum() + a[-n_recent:].sum()
    threshold = float(np.sort(mass.ravel())[1:3].mean())  # two planes lazy, two not
    policy = SimLayerKVPolicy(lazy_threshold=threshold, n_last=n_last, n_recent=n_recent, n_initial=n_initial)
    before, after = handoff(policy)
    np.testing.assert_array_equal(np.asarray(policy.lazy(before)), mass > threshold)
    self.assertIsNone(after.scores)  # the decode cache records nothing
    for (l, b, h), kept in kept_positions(after).items():
      n = LENGTHS[b]
      lazy = mass[l, b] > threshold
      want = list(range(n_initial)) + list(range(n - n_recent + n_last, n)) if lazy else list(range(n))
      self.assertEqual(kept, want, f"layer {l} row {b} kv head {h} (lazy {lazy})")

  def test_short_prompt_and_threshold_one_keep_everything(self):
    for policy in (SimLayerKVPolicy(lazy_threshold=0.0, n_recent=20, n_initial=2),  # 22 <= 2 + 20 + 1
                   SimLayerKVPolicy(lazy_threshold=1.0, n_recent=4, n_initial=2)):
      before, after = handoff(policy)
      self.assertFalse(bool(np.any(np.asarray(policy.lazy(before)))))
      self.assertEqual(kept_positions(after), kept_positions(before))


class ExpectedAttentionOnlineTest(parameterized.TestCase):

  @parameterized.named_parameters(("_one_shot", 1), ("_chunked", 2))
  def test_kept_positions_equal_numpy(self, chunks):
    n_sink, n_future = 2, 16
    policy = ExpectedAttentionPolicy(BUDGET, statistics="online", n_sink=n_sink, n_future_positions=n_future)
    before, after = handoff(policy, chunks, capacity=BUDGET + 2)
    self.assertIsNone(after.stats)
    k, v = post_rope_keys(before), np.asarray(before.v, np.float64)
    q = np_queries()
    d = CFG.head_dim
    for (l, b, h), kept in kept_positions(after).items():
      n = LENGTHS[b]
      # ExpectedAttentionPress.get_query_statistics: pre-RoPE queries after the sinks, covariance over N.
      qs = q[l, b, n_sink:n, h * G:(h + 1) * G]  # [N, G, D]
      mu = qs.mean(0)
      cov = np.einsum("ngi,ngj->gij", qs - mu, qs - mu) / qs.shape[0]
      rot = np.mean(np_rope(np.eye(d)[None], np.repeat(np.arange(n, n + n_future)[:, None], d, 1)), axis=0).T
      mu, cov = mu @ rot.T, rot @ cov @ rot.T
      ks = k[l, b, n_sink:n, h]
      z = ks @ mu.T / np.sqrt(d) + np.einsum("si,gij,sj->sg", ks, cov, ks) / d / 2
      probs = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
      score = probs.mean(1) * np.linalg.norm(v[l, b, n_sink:n, h], axis=-1)
      score = np.concatenate([np.full(n_sink, score.max() + 1), score])
      self.assertEqual(kept, top_budget(score, BUDGET), f"layer {l} row {b} kv head {h}")

  def test_registry_option_and_roomy_budget_equals_full(self):
    """`cache.expected_attention_statistics="online"` reaches the policy, which needs no statistics file; with a
    budget over the run it never evicts, so greedy generation equals the full cache's."""
    prompts = [inputs()[0][b, :n].tolist() for b, n in enumerate(LENGTHS)]
    roomy = registry.make_policy("expectedattention", {"size": 64, "expected_attention_statistics": "online"})
    self.assertEqual((roomy.statistics, roomy.stats_path), ("online", ""))
    got = generation.generate(model(), CFG, prompts, max_new_tokens=4, policy=roomy, bucket=8).tokens
    want = generation.generate(model(), CFG, prompts, max_new_tokens=4, policy=FullPolicy(), bucket=8).tokens
    self.assertEqual(got, want)

  def test_rejects_an_unknown_source(self):
    with self.assertRaisesRegex(ValueError, r"statistics='prompt' must be one of \['calibrated', 'online'\]"):
      ExpectedAttentionPolicy(BUDGET, statistics="prompt")


if __name__ == "__main__":
  absltest.main()
