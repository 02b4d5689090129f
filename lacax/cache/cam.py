"""CaM, cache merging (Zhang et al., ICML 2024, openreview LCTmppB165): decode-time compression that merges the
values of evicted tokens into their kept neighbours before pruning.

Reference NVIDIA/kvpress `presses/cam_press.py::CAMPress` (a `DecodingPress`), per (layer, row), every
`compression_interval` decode steps, once the layer holds more than `target_size` tokens:

  1. the inner scorer's scores, averaged over the KV heads, choose one kept set for all heads: the top
     `target_size`; the others are evicted;
  2. merge candidates: the k = (decode steps since the last compression) evicted tokens of largest score (ties:
     the later token first);
  3. each candidate m merges into its window, the `merge_budget` kept tokens right after it in sequence order
     (fewer at the end: `actual` of them);
  4. per KV head, p = clamp(A_m / mean(A over the window), 0, 1) with A the attention each token received,
     summed over the decode steps since the prefill (kvpress's running sum, moved with the kept tokens;
     0 / 0 -> 0, x / 0 -> 1), and the merge happens with probability p (Bernoulli);
  5. every merged candidate adds v_m / actual to the value of each token of its window (several candidates may
     add to one token), then the evicted tokens are dropped.

lacax records A as the "accumulate" attention statistic (the decode steps' queries, mean over each KV head's
query heads, as kvpress), zeroed at the prefill hand-off so it starts with decoding, as kvpress's running sum.
The inner scorer must read no attention statistic of its own (its `score_mode` is None: Knorm, KeyDiff,
ExpectedAttention, ...), since the cache records one. The Bernoulli draws come from `seed` and the count of
compressions (kvpress: torch's global generator), so the merges are reproducible but not torch's; with
`merge_probability="threshold"` a merge happens when p >= 0.5 instead (deterministic, an option of lacax).
kvpress scores with its buffer of the last `hidden_states_buffer_size` decode hidden states; lacax's inner
scorer reads the cache (as lacax's DecodingPolicy). Decode-time only: nothing happens at prefill.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import CachePolicy, IntervalDecodeWrapper, ranked_scores, resize
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig

MERGE_PROBABILITIES = ("bernoulli", "threshold")


@flax.struct.dataclass
class CAMState:
  """steps: decode steps since the last compression; compressions: how many ran (the draws' counter);
  inner: the inner policy's own state."""

  steps: jax.Array
  compressions: jax.Array
  inner: Any = None


def merge_plan(scores: jax.Array, attention: jax.Array, valid: jax.Array, target_size: int, num_merge: int,
               merge_budget: int, uniform: jax.Array, threshold: bool):
  """One layer and row's CaM step (kvpress `CAMPress.compress`), in slot order (= sequence order at decode).

  Args:
    scores: [S] the inner scores averaged over the KV heads (+inf = protected); attention: [S, KV] accumulated
      attention; valid: [S] held slots; uniform: [S, KV] draws in [0, 1).
    target_size, merge_budget: as `CAMPolicy`; num_merge: candidates (kvpress's k, may be traced).

  Returns:
    (keep [S] bool, weights [S_target_token j, S_candidate m, KV] float32: what value m adds to value j).
  """
  s = scores.shape[0]
  rank = plans.descending_rank(scores[None, None, :, None], valid[None, None, :, None])[0, 0, :, 0]
  keep = valid & (rank < target_size)
  evicted = valid & ~keep
  # Candidates: the num_merge evicted of largest score, the later token first on ties.
  slot = jnp.arange(s)
  order = jnp.lexsort((-slot, -jnp.where(evicted, scores, -jnp.inf)))  # primary: score desc, then later slot
  cand_rank = jnp.argsort(order)
  candidate = evicted & (cand_rank < num_merge)
  kept_rank = jnp.cumsum(keep) - 1  # rank of each kept slot among the kept, in slot order
  start = jnp.cumsum(keep) - keep  # kept slots before m (m is not kept): kvpress's searchsorted(right=True)
  n_kept = jnp.sum(keep)
  actual = jnp.clip(jnp.minimum(merge_budget, n_kept - start), 0, None).astype(jnp.float32)  # [S] per m
  window = (keep[:, None] & candidate[None, :] & (kept_rank[:, None] >= start[None, :])
            & (kept_rank[:, None] < start[None, :] + merge_budget))  # [j, m]
  mean_attn = jnp.einsum("jm,jk->mk", window.astype(jnp.float32), attention) / jnp.maximum(actual, 1.0)[:, None]
  own = attention  # [m, KV]
  prob = jnp.where(mean_attn > 0, own / jnp.where(mean_attn > 0, mean_attn, 1.0), jnp.where(own > 0, 1.0, 0.0))
  prob = jnp.clip(prob, 0.0, 1.0)
  merged = (prob >= 0.5) if threshold else (uniform < prob)
  coef = jnp.where(candidate[:, None] & (actual[:, None] > 0), merged / jnp.maximum(actual, 1.0)[:, None], 0.0)
  return keep, window.astype(jnp.float32)[:, :, None] * coef[None, :, :]


@dataclasses.dataclass(frozen=True)
class CAMPolicy(IntervalDecodeWrapper):
  """CaM: every `compression_interval` decode steps, merge the evicted tokens' values into kept neighbours and
  keep `target_size` tokens per (layer, row), chosen by `inner`.

  Attributes:
    inner: the scorer (its `score_mode` must be None: the cache records CaM's own attention sum).
    target_size: tokens kept per (layer, row) after a compression (2048, kvpress).
    compression_interval: decode steps between compressions (512, kvpress).
    merge_budget: kept neighbours each merged value is spread over (32, kvpress).
    merge_probability: "bernoulli" (kvpress) or "threshold" (merge when p >= 0.5).
    seed: PRNG seed of the Bernoulli draws.
  """

  inner: CachePolicy
  target_size: int
  compression_interval: int = 512
  merge_budget: int = 32
  merge_probability: str = "bernoulli"
  seed: int = 0

  score_mode = "accumulate"
  score_agg = "mean"

  def __post_init__(self):
    self._check_inner("CAM")
    plans.check_int("CAM", "target_size", self.target_size, 1)
    plans.check_int("CAM", "compression_interval", self.compression_interval, 1)
    plans.check_int("CAM", "merge_budget", self.merge_budget, 1)
    plans.check_int("CAM", "seed", self.seed, 0)
    if self.merge_probability not in MERGE_PROBABILITIES:
      raise ValueError(f"CAM merge_probability={self.merge_probability!r} must be one of "
                       f"{list(MERGE_PROBABILITIES)}")
    if self.inner.score_mode is not None:
      raise ValueError(f"CAM inner={type(self.inner).__name__} records attention (score_mode="
                       f"{self.inner.score_mode!r}); CAM's cache records its own attention sum, so the inner "
                       "scorer must read none (Knorm, KeyDiff, ExpectedAttention, ...)")

  @property
  def name(self) -> str:
    return "cam"

  def init_state(self, cfg: ModelConfig) -> CAMState:
    # Two arrays, not one twice: a generation donates the cache, and one buffer cannot be donated twice.
    return CAMState(steps=jnp.zeros((), jnp.int32), compressions=jnp.zeros((), jnp.int32),
                    inner=self.inner.init_state(cfg))

  def _cam_state(self, cache: KVCache) -> CAMState:
    if not isinstance(cache.state, CAMState):
      raise ValueError(f"CAMPolicy.compact needs a cache built by CAMPolicy.init (state is "
                       f"{type(cache.state).__name__}, expected CAMState)")
    return cache.state

  def merge_and_compress(self, cache: KVCache, compressions: jax.Array, num_merge: jax.Array) -> KVCache:
    """The CaM step on every (layer, row) holding more than `target_size` (the cache's state is the inner's);
    `num_merge` candidates (kvpress: the decode steps since the last compression)."""
    if cache.quantized:
      raise ValueError("CAM merges values in place; it needs a float cache (not cache.kv_bits=8)")
    scores, protected = self.inner.keep_scores(cache)
    mean = jnp.mean(ranked_scores(scores, protected), axis=-1)  # [L, B, S] over the KV heads
    valid = jnp.any(cache.valid(), axis=-1)
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), compressions)
    uniform = jax.random.uniform(key, cache.scores.shape, jnp.float32)
    threshold = self.merge_probability == "threshold"

    def layer(args):
      s, a, ok, u, v = args  # one layer: [B, S], [B, S, KV], [B, S], [B, S, KV], [B, S, KV, D]
      keep, w = jax.vmap(lambda *x: merge_plan(*x[:3], self.target_size, num_merge, self.merge_budget, x[3],
                                               threshold))(s, a, ok, u)
      over = jnp.sum(ok, axis=-1) > self.target_size  # [B]: rows within the target are left alone
      delta = jnp.einsum("bjmk,bmkd->bjkd", w, v.astype(jnp.float32))
      v = jnp.where(over[:, None, None, None], v.astype(jnp.float32) + delta, v.astype(jnp.float32))
      return jnp.where(over[:, None], keep, ok), v.astype(cache.v.dtype)

    keep, values = jax.lax.map(layer, (mean, cache.scores, valid, uniform, cache.v))
    merged = cache.replace(v=values)
    return plans.apply_plan(merged, lambda c: plans.keep_mask_plan(keep[..., None], c.capacity),
                            jnp.any(plans.occupancy(cache) > self.target_size), None)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    state = self._cam_state(cache)
    zero = jnp.zeros((), jnp.int32)
    if capacity is not None:  # the hand-off: nothing compressed; the attention sum starts with decoding
      out = resize(cache, capacity)
      return out.replace(scores=jnp.zeros_like(out.scores), state=state.replace(steps=zero))
    steps = state.steps + 1
    due = (steps >= self.compression_interval) & jnp.any(plans.occupancy(cache) > self.target_size)
    inner_cache = cache.replace(state=state.inner)
    out = jax.lax.cond(due, lambda c: self.merge_and_compress(c, state.compressions, steps),
                       lambda c: c, inner_cache)
    return out.replace(state=CAMState(steps=jnp.where(due, 0, steps),
                                      compressions=state.compressions + due.astype(jnp.int32), inner=out.state))
