"""H2O (heavy-hitter oracle, arXiv 2306.14048): the recent window + the tokens with most accumulated attention.

Reference FMInference/H2O; the shared conventions of the score-based policies (GQA reduction, batch rows,
slot order, ties, positions) are in `lacax.cache.plans`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import BudgetPolicy
from lacax.cache.kv_cache import KVCache

SCORE_NORMS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class H2OPolicy(BudgetPolicy):
  """H2O (heavy-hitter oracle): the `recent` newest tokens + the `heavy` tokens with most accumulated attention.

  Reference FMInference/H2O `h2o_hf/utils_real_drop/modify_llama.py::H2OKVCache_LayerWise`: after every forward
  (prefill and each decode step) the attention each cached token received is added to its score (summed over
  all the step's queries, so over every query since the token arrived); when the cache holds more than
  heavy + recent tokens it keeps the last `recent` and the top-`heavy` of the older ones by score, per head.
  Scores travel with their tokens and are dropped with evicted ones (`gather_slots` gathers them).

  lacax scores per KV head (the group reduced with `score_agg`; the reference is per query head on MHA) and per
  batch row (the reference sums scores over the batch). Ties go to the older token.

  Attributes:
    heavy: heavy-hitter budget (>= 0).
    recent: recent-window budget (>= 0); heavy + recent >= 1.
    score_agg: GQA group reduction of the recorded attention: "mean", "max" or "sum".
    rope_mode: "original" (default, as the reference), "slot" or "stored" (post-RoPE keys).
    score_norm: "sum" (default, the H2O reference: attention summed over every query since the token arrived)
      or "mean" (NVIDIA/kvpress's ObservedAttentionPress, `observed_attention_press.py::score`: the sum divided
      by the number of queries that could see the token, `attentions.sum(2) / arange(n, 0, -1)`, i.e. the
      mean received attention). lacax divides by (tokens the row has seen) - (the token's position), which
      is kvpress's divisor for a prefilled prompt and keeps counting through decode; kvpress applies the
      press once, at prefill.
  """

  heavy: int
  recent: int
  score_agg: str = "mean"
  rope_mode: str = "original"
  score_norm: str = "sum"

  score_mode = "accumulate"

  def __post_init__(self):
    if self.score_norm not in SCORE_NORMS:
      raise ValueError(f"H2O score_norm={self.score_norm!r} must be one of {list(SCORE_NORMS)}")
    plans.check_int("H2O", "heavy", self.heavy, 0)
    plans.check_int("H2O", "recent", self.recent, 0)
    if self.heavy + self.recent < 1:
      raise ValueError(f"H2O heavy={self.heavy} + recent={self.recent} must be >= 1")
    plans.check_rope_and_agg("H2O", self)

  @property
  def budget(self) -> int:
    return self.heavy + self.recent

  def heavy_scores(self, cache: KVCache) -> jax.Array:
    """[L, B, S, KV] float32: the statistic the heavy hitters are ranked by (`score_norm`)."""
    if self.score_norm == "sum":
      return cache.scores
    seen = jnp.max(cache.pos, axis=(0, 2, 3), keepdims=True) + 1  # [1, B, 1, 1] tokens the row has seen
    return cache.scores / jnp.maximum(seen - cache.pos, 1).astype(jnp.float32)

  def keep_scores(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """The heavy-hitter statistic; the `recent` newest tokens protected."""
    plans.require_scores("H2O", cache, self.score_mode)
    return self.heavy_scores(cache), plans.recent_mask(cache.valid(), self.recent)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    plans.require_scores("H2O", cache, self.score_mode)
    def plan(c: KVCache) -> jax.Array:
      valid = c.valid()
      recent = plans.recent_mask(valid, self.recent)
      return plans.topk_keep_plan(self.heavy_scores(c), valid, self.heavy, recent, capacity or c.capacity)

    return plans.apply_plan(cache, plan, jnp.any(plans.occupancy(cache) > self.budget), capacity)
