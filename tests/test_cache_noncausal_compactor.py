"""NonCausalAttn and Compactor (`lacax.cache.noncausal`, `lacax.cache.compactor`) against plain NumPy.

kvpress's `NonCausalAttnPress.non_causal_chunked_attn` and `CompactorPress.score` are restated step by step in
NumPy (zero padding of the last chunk with its 0 / -1e-9 logits, sum over queries, mean over the group, value
norm, average pooling with counted zero padding, z-normalisation, the sinks, the blend with z-scored leverage)
from the model's own queries and the cache's keys and values, on a tiny GQA model with rows of different
lengths and chunks small enough that both rows end in a padded chunk; the recorded queries are checked
against the model's, and they move with their slots.
"""

from __future__ import annotations

import math

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import registry
from lacax.cache.compactor import CompactorPolicy
from lacax.cache.kv_cache import StatsRecording, gather_slots, init_stats
from lacax.cache.leverage import gaussian_sketch
from lacax.cache.noncausal import NonCausalAttnPolicy
from lacax.cache.full import FullPolicy
from tests.cache_policies import kept_positions, top_budget
from tests.test_cache_recorded_methods import (BUDGET, CFG, G, LENGTHS, SLOTS, handoff, np_queries, np_rope,
                                               post_rope_keys, prefill)


def np_chunked_column_sums(q: np.ndarray, k: np.ndarray, chunk: int) -> np.ndarray:
  """kvpress `non_causal_chunked_attn` for one KV head: q [G, S, D], k [S, D] -> [S] (mean over G)."""
  g, s, d = q.shape
  s_pad = math.ceil(s / chunk) * chunk
  pad = s_pad - s
  qp = np.concatenate([q, np.zeros((g, pad, d))], 1)
  kp = np.concatenate([k, np.zeros((pad, d))], 0)
  out = np.zeros((g, s_pad))
  for c in range(s_pad // chunk):
    sl = slice(c * chunk, (c + 1) * chunk)
    dots = np.einsum("gid,jd->gij", qp[:, sl], kp[sl])
    if c == s_pad // chunk - 1 and pad > 0:
      invalid = np.arange(c * chunk, (c + 1) * chunk) >= s
      dots[:, invalid, :] = 0.0
      dots[:, :, invalid] = -1e-9
    e = np.exp(dots - dots.max(-1, keepdims=True))
    out[:, sl] = (e / e.sum(-1, keepdims=True)).sum(1)
  return out[:, :s].mean(0)


def np_zscore(x: np.ndarray) -> np.ndarray:
  return (x - x.mean()) / max(x.std(ddof=1), 1e-6)


def np_noncausal(before, l: int, b: int, left: int, right: int, chunk: int) -> np.ndarray:
  """[KV, S'] z-scored NonCausalAttn scores of the tokens [left, n - right) of (layer l, row b)."""
  n = LENGTHS[b]
  t = np.arange(left, n - right)
  q = np_rope(np_queries()[l, b, t], t[:, None])  # [S', H, D]
  k, v = post_rope_keys(before)[l, b, t], np.asarray(before.v, np.float64)[l, b, t]
  rows = []
  for h in range(CFG.num_kv_heads):
    a = np_chunked_column_sums(np.moveaxis(q[:, h * G:(h + 1) * G], 1, 0), k[:, h], chunk)
    s = a * np.linalg.norm(v[:, h], axis=-1)
    sp = np.pad(s, 1)
    rows.append((sp[:-2] + sp[1:-1] + sp[2:]) / 3.0)
  return np_zscore(np.stack(rows))


def np_leverage(keys: np.ndarray, sketch: np.ndarray) -> np.ndarray:
  """kvpress `compute_leverage_scores` (first-try jitter 1e-2): keys [S, D] pre-RoPE, sketch [D, k]."""
  x = (keys - keys.mean(0)) @ sketch
  gram = x.T @ x + 1e-2 * np.eye(x.shape[1])
  return np.maximum(np.einsum("sk,kj,sj->s", x, np.linalg.inv(gram), x), 0.0)


class NonCausalAttnTest(parameterized.TestCase):

  def test_recorded_queries_are_the_models_and_move_with_their_slots(self):
    cache = FullPolicy(rope_mode="original").init(CFG, len(LENGTHS), SLOTS)
    _, cache = prefill(cache.replace(stats=init_stats(CFG, len(LENGTHS), SLOTS, StatsRecording(queries=True))))
    got = np.asarray(cache.stats.queries)  # [L, B, S, KV, G, D]
    want = np_queries().reshape(CFG.num_layers, len(LENGTHS), -1, CFG.num_kv_heads, G, CFG.head_dim)
    for b, n in enumerate(LENGTHS):
      np.testing.assert_allclose(got[:, b, :n], want[:, b, :n], rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(got[:, b, n:], 0.0)
    src = jnp.asarray([7, 0, 3, -1], jnp.int32)[None, None, :, None]
    moved = np.asarray(gather_slots(cache, src).stats.queries)
    np.testing.assert_array_equal(moved[:, :, :3], got[:, :, [7, 0, 3]])
    np.testing.assert_array_equal(moved[:, :, 3], 0.0)

  @parameterized.named_parameters(("_chunk5", 5), ("_chunk8", 8), ("_one_chunk", 32))
  def test_kept_positions_equal_numpy(self, chunk):
    policy = NonCausalAttnPolicy(BUDGET, chunk_size=chunk)
    before, after = handoff(policy, capacity=BUDGET)
    self.assertIsNone(after.stats)  # the queries are read once, at the hand-off
    for b in range(len(LENGTHS)):
      for l in range(CFG.num_layers):
        score = np_noncausal(before, l, b, 0, 0, chunk)
        for h in range(CFG.num_kv_heads):
          self.assertEqual(kept_positions(after)[(l, b, h)], top_budget(score[h], BUDGET),
                           f"layer {l} row {b} kv head {h}")

  def test_needs_recorded_queries(self):
    cache = FullPolicy(rope_mode="original").init(CFG, len(LENGTHS), SLOTS)
    _, cache = prefill(cache)
    policy = NonCausalAttnPolicy(BUDGET)
    with self.assertRaisesRegex(ValueError, "records no queries"):
      policy.compact(cache.replace(state=policy.init(CFG, 1, 4).state), capacity=BUDGET)


class CompactorTest(parameterized.TestCase):

  @parameterized.named_parameters(("_attention_only", 0.0, 5), ("_blended", 0.7, 4), ("_ratio", None, 8))
  def test_kept_positions_equal_numpy(self, blending, chunk):
    left, right = 3, 2
    policy = CompactorPolicy(BUDGET, sink_size_start=left, sink_size_end=right, chunk_size=chunk,
                             sketch_dimension=4, blending=blending)
    before, after = handoff(policy, capacity=BUDGET)
    pre = np.asarray(before.k, np.float64)  # rope_mode "original": the cache holds pre-RoPE keys
    sketch = np.asarray(gaussian_sketch(jax.random.PRNGKey(0), (CFG.num_layers, len(LENGTHS), CFG.num_kv_heads),
                                        CFG.head_dim, 4), np.float64)
    for b, n in enumerate(LENGTHS):
      w = blending if blending is not None else 1.0 - BUDGET / n
      for l in range(CFG.num_layers):
        attn = np_noncausal(before, l, b, left, right, chunk)
        lev = np_zscore(np.stack([np_leverage(pre[l, b, left:n - right, h], sketch[l, b, h])
                                  for h in range(CFG.num_kv_heads)]))
        for h in range(CFG.num_kv_heads):
          score = np.full(n, np.inf)  # the sinks rank first
          score[left:n - right] = w * lev[h] + attn[h]
          kept = kept_positions(after)[(l, b, h)]
          self.assertEqual(kept, top_budget(score, BUDGET), f"layer {l} row {b} kv head {h}")
          self.assertContainsSubset([*range(left), *range(n - right, n)], kept)

  def test_registry_fields_and_validation(self):
    policy = registry.make_policy("compactor", {"size": 12, "sink_size_start": 2, "compactor_blending": 0.5,
                                                "attention_chunk_size": 64})
    self.assertEqual((policy.budget, policy.sink_size_start, policy.blending, policy.chunk_size), (12, 2, 0.5, 64))
    self.assertEqual(registry.make_policy("noncausal", {"size": 12, "attention_chunk_size": 16}).chunk_size, 16)
    with self.assertRaisesRegex(ValueError, "Compactor chunk_size"):
      CompactorPolicy(8, chunk_size=0)
    with self.assertRaisesRegex(ValueError, "Compactor blending"):
      CompactorPolicy(8, blending=-1.0)
    with self.assertRaisesRegex(ValueError, "NonCausalAttn chunk_size"):
      NonCausalAttnPolicy(8, chunk_size=True)


if __name__ == "__main__":
  absltest.main()
