"""CaM (`lacax.cache.cam`, kvpress `CAMPress`) against a NumPy statement of one merge-and-prune step.

A tiny GQA model prefills two prompts of different lengths, decodes `compression_interval` tokens, and the
compression step is restated in NumPy from the cache just before it: the kept set (Knorm's scores averaged
over the KV heads), the merge candidates (the last-step count of evicted tokens of largest score, later token
first on ties), each one's window of kept neighbours, the merge probabilities from the decode-time attention
sums, the draws, and the values after the merges. Both the deterministic threshold and the Bernoulli draws
are checked; the attention sum starts at the hand-off; bad fields are named.
"""

from __future__ import annotations

import functools

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import registry
from lacax.cache.cam import CAMPolicy
from lacax.cache.knorm import KnormPolicy
from lacax.cache.snapkv import SnapKVPolicy
from lacax.model import config as config_lib
from lacax.model import llama

CFG = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8)
LENGTHS = (20, 15)
T = 20
TARGET, INTERVAL, MERGE = 12, 4, 3


@functools.lru_cache(maxsize=None)
def model():
  return llama.init_params(CFG, jax.random.PRNGKey(5), std=0.3)


_forward = jax.jit(llama.forward, static_argnames=("cfg",))


def run(policy):
  """(cache before the first compression, cache after it) of a prefill + INTERVAL decode steps."""
  rng = np.random.RandomState(1)
  tokens = rng.randint(1, CFG.vocab_size, (len(LENGTHS), T)).astype(np.int32)
  t = np.arange(T)[None, :]
  positions = np.where(t < np.asarray(LENGTHS)[:, None], t, -1).astype(np.int32)
  capacity = policy.run_capacity(CFG, T, INTERVAL)
  cache = policy.init(CFG, len(LENGTHS), T)
  _, cache = _forward(model(), jnp.asarray(tokens), jnp.asarray(positions), cache, CFG)
  cache = jax.jit(lambda c: policy.compact(c, capacity=capacity))(cache)
  np.testing.assert_array_equal(np.asarray(cache.scores), 0.0)  # the attention sum starts with decoding
  compact = jax.jit(policy.compact)
  for step in range(INTERVAL):
    new = jnp.asarray(rng.randint(1, CFG.vocab_size, (len(LENGTHS), 1)), jnp.int32)
    pos = jnp.asarray(np.asarray(LENGTHS)[:, None] + step, jnp.int32)
    _, cache = _forward(model(), new, pos, cache, CFG)
    if step < INTERVAL - 1:
      cache = compact(cache)
      assert int(cache.state.steps) == step + 1
  return cache, compact(cache)


def np_cam(before, policy, uniform):
  """({(layer, row): (kept positions, their values [n, KV, D])}, merges done) of kvpress's CAMPress.compress."""
  k = np.asarray(before.k, np.float64)  # pre-RoPE: the norm is RoPE-invariant
  v = np.asarray(before.v, np.float64)
  a = np.asarray(before.scores, np.float64)
  pos = np.asarray(before.pos)
  out, merges = {}, 0
  for l in range(CFG.num_layers):
    for b in range(len(LENGTHS)):
      n = int((pos[l, b, :, 0] >= 0).sum())
      score = -np.linalg.norm(k[l, b, :n], axis=-1).mean(-1)  # Knorm, mean over the KV heads
      order = np.argsort(-score, kind="stable")
      kept = np.sort(order[:TARGET])
      evicted = np.sort(order[TARGET:])
      ev_order = np.argsort(-score[evicted][::-1], kind="stable")[:INTERVAL]  # later first on ties
      merge = np.sort(evicted[::-1][ev_order])
      values = v[l, b, :n].copy()
      for m in merge:
        start = int(np.searchsorted(kept, m, side="right"))
        window = kept[start:start + MERGE]
        if not len(window):
          continue
        mean = a[l, b, window].mean(0)  # [KV]
        with np.errstate(divide="ignore", invalid="ignore"):
          p = a[l, b, m] / mean
        p = np.clip(np.where(np.isnan(p), 0.0, np.where(np.isinf(p), 1.0, p)), 0.0, 1.0)
        mask = (p >= 0.5) if policy.merge_probability == "threshold" else (uniform[l, b, m] < p)
        values[window] += (mask / len(window))[None, :, None] * v[l, b, m][None]
        merges += int(mask.sum())
      out[(l, b)] = (pos[l, b, kept, 0].tolist(), values[kept])
  return out, merges


class CAMTest(parameterized.TestCase):

  @parameterized.named_parameters(("_threshold", "threshold"), ("_bernoulli", "bernoulli"))
  def test_one_compression_equals_numpy(self, mode):
    policy = CAMPolicy(KnormPolicy(TARGET), TARGET, compression_interval=INTERVAL, merge_budget=MERGE,
                       merge_probability=mode, seed=3)
    before, after = run(policy)
    self.assertEqual(int(after.state.steps), 0)
    self.assertEqual(int(after.state.compressions), 1)
    uniform = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(3), 0), before.scores.shape))
    want, merges = np_cam(before, policy, uniform)
    self.assertGreater(merges, 0)  # the check covers real merges, not only the pruning
    pos, v = np.asarray(after.pos), np.asarray(after.v, np.float64)
    for (l, b), (kept, values) in want.items():
      for h in range(CFG.num_kv_heads):
        self.assertEqual([int(p) for p in pos[l, b, :, h] if p >= 0], kept, f"layer {l} row {b} head {h}")
      np.testing.assert_allclose(v[l, b, :len(kept)], values, rtol=1e-5, atol=1e-6)

  def test_registry_and_validation(self):
    policy = registry.make_policy("cam", {"size": 16, "merge_budget": 4, "compression_interval": 8})
    self.assertIsInstance(policy.inner, KnormPolicy)
    self.assertEqual((policy.target_size, policy.merge_budget, policy.compression_interval), (16, 4, 8))
    with self.assertRaisesRegex(ValueError, "CAM inner=SnapKVPolicy records attention"):
      CAMPolicy(SnapKVPolicy(capacity=16, window=4), 16)
    with self.assertRaisesRegex(ValueError, "CAM merge_budget=0"):
      CAMPolicy(KnormPolicy(16), 16, merge_budget=0)
    with self.assertRaisesRegex(ValueError, "CAM merge_probability='coin'"):
      CAMPolicy(KnormPolicy(16), 16, merge_probability="coin")


if __name__ == "__main__":
  absltest.main()
