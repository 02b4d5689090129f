"""TOVA (token omission via attention, arXiv 2401.06104): keep the keys the newest query attends to most.

Reference schwartz-lab-NLP/TOVA; the shared conventions of the score-based policies are in `lacax.cache.plans`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import BudgetPolicy
from lacax.cache.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class TOVAPolicy(BudgetPolicy):
  """TOVA (token omission via attention): keep the `budget` keys the newest query attends to most.

  Reference schwartz-lab-NLP/TOVA `src/tova_cache.py::TOVACache.reduce`: after every forward, if the layer holds
  more than `budget` keys, the last query's attention averaged over all heads selects the top-`budget` keys,
  and every head of the layer keeps that same set.

  lacax records the last query's attention per KV head (the group reduced with `score_agg`) and averages over
  the KV heads; with the default "mean" this is the reference's mean over all query heads. The plan is shared
  by the heads of a (layer, row). Ties go to the older token.

  Attributes:
    budget: keys kept per layer (>= 1).
    score_agg: GQA group reduction before the mean over KV heads ("mean" reproduces the reference).
    rope_mode: "original" (default: kept keys keep their positions), "slot" or "stored".
  """

  budget: int
  score_agg: str = "mean"
  rope_mode: str = "original"

  score_mode = "last"

  def __post_init__(self):
    plans.check_int("TOVA", "budget", self.budget, 1)
    plans.check_rope_and_agg("TOVA", self)

  def keep_scores(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """The last query's attention averaged over the kv heads, the same for every head; nothing protected."""
    plans.require_scores("TOVA", cache, self.score_mode)
    scores = jnp.broadcast_to(jnp.mean(cache.scores, axis=-1, keepdims=True), cache.scores.shape)
    return scores, jnp.zeros(cache.scores.shape, bool)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    plans.require_scores("TOVA", cache, self.score_mode)
    valid = jnp.any(cache.valid(), axis=-1, keepdims=True)  # [L, B, S, 1]; the heads hold the same tokens

    def plan(c: KVCache) -> jax.Array:  # [L, B, S_out, 1]
      scores = jnp.mean(c.scores, axis=-1, keepdims=True)
      return plans.topk_keep_plan(scores, valid, self.budget, None, capacity or c.capacity)

    return plans.apply_plan(cache, plan, jnp.any(jnp.sum(valid, axis=2) > self.budget), capacity)
