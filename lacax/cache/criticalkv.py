"""CriticalKV (arXiv 2502.03805): any scorer's ranking re-weighted by what a token adds to the layer's output.

Reference NVIDIA/kvpress `presses/criticalkv_press.py::CriticalKVPress` (a `ScorerPress` wrapping a
`ScorerPress`). With the inner method's scores s and a budget of n tokens per (layer, row, kv head):

  1. stage one: the int(n * first_stage_ratio) tokens of largest s are kept (kvpress scatters
     `finfo.max` into their scores; it rounds int((1 - ratio) * k_len * first_stage_ratio) from the unrounded
     budget, which can be one more token for some ratios: lacax's budget is a token count, so it rounds once;
     at least one token when first_stage_ratio > 0, as kvpress 0.5.5);
  2. stage two: every other token is scored (s + epsilon) * ||W_o v||_1, the L1 norm over the model width of
     the value's output projection, per query head, averaged over the kv head's group (`vwl1norm`);
  3. the top n of the merged scores are kept.

lacax records ||W_o v||_1 in the forward (`StatsRecording(value_norm=True)`, one number per slot and kv head
that moves with its slot), since a policy sees the cache, not the model's weights. kvpress reads `o_proj.weight`
and the values of its cache; lacax reads the layer's dense W_o (the base weight without LoRA deltas, as kvpress)
and the values the forward writes (before int8 quantization, for an int8 cache). The inner policy's protected
tokens (SnapKV's window, sinks) rank before both stages, as the inner policy's own top score makes them rank
first in kvpress. CriticalAdaKV (the head-adaptive variant) is `lacax.cache.criticaladakv`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy, SelectingWrapper, ValueNormWrapper, ranked_scores
from lacax.cache.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class CriticalKVPolicy(ValueNormWrapper, SelectingWrapper):
  """CriticalKV: `budget` tokens per (layer, row, kv head), half by the inner score, half by it times ||W_o v||_1.

  It compresses when the inner policy would (the prefill hand-off for a prompt compressor or a prefill-time
  scorer, every step for a decode-time one); after a prefill-only hand-off the decode cache records nothing.

  Attributes:
    inner: the scorer policy (any policy defining `keep_scores`; kvpress: any ScorerPress). An inner
      ExpectedAttention should be built with `use_vnorm=False` (kvpress warns otherwise).
    budget: tokens kept per (layer, row, kv head) (kvpress: int(k_len * (1 - compression_ratio))).
    epsilon: added to the inner score before the re-weighting (1e-4, kvpress).
    first_stage_ratio: fraction of the budget chosen by the inner score alone (0.5, kvpress), in [0, 1].
    lean_decode: after a prefill-only hand-off the decode cache records nothing (False inside a composition
      whose other policy still reads the recordings).
  """

  inner: CachePolicy
  budget: int
  epsilon: float = 1e-4
  first_stage_ratio: float = 0.5
  lean_decode: bool = True

  def __post_init__(self):
    self._check_inner("CriticalKV")
    plans.check_int("CriticalKV", "budget", self.budget, 1)
    plans.check_number("CriticalKV", "first_stage_ratio", self.first_stage_ratio, 0, 1)
    plans.check_number("CriticalKV", "epsilon", self.epsilon, 0)

  @property
  def first_stage_budget(self) -> int:
    """Tokens kept by the inner score alone (kvpress: int((1 - ratio) * k_len * first_stage_ratio), at least 1
    when first_stage_ratio > 0, as kvpress 0.5.5 floors it)."""
    return max(1, int(self.budget * self.first_stage_ratio)) if self.first_stage_ratio > 0 else 0

  @property
  def sink_tokens(self) -> int:
    # The inner policy's sinks score above its other tokens, so they are among the first stage's (if it has room).
    return min(self.inner.sink_tokens, self.first_stage_budget)

  def layer_bounds(self, cfg) -> np.ndarray:
    return np.full(cfg.num_layers, self.budget)

  def over_budget(self, cache: KVCache) -> jax.Array:
    return jnp.any(plans.occupancy(cache) > self.budget)

  def keep_scores(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """The merged two-stage scores (stage-one tokens at float32 max) and the inner policy's protected tokens,
    so that CriticalKV is itself a scorer other wrappers can take (kvpress's CriticalKVPress is a ScorerPress)."""
    scores, protected = self.inner.keep_scores(cache)
    second = plans.value_weighted(scores, cache, self.epsilon, "CriticalKV")
    valid = cache.valid()
    first = valid & (plans.descending_rank(ranked_scores(scores, protected), valid) < self.first_stage_budget)
    return jnp.where(first, jnp.finfo(jnp.float32).max, second), protected

  def keep_mask(self, cache: KVCache) -> jax.Array:
    scores, protected = self.keep_scores(cache)
    valid = cache.valid()
    rank = plans.descending_rank(ranked_scores(scores, protected), valid)
    return valid & (protected | (rank < self.budget))
