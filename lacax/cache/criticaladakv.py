"""CriticalAdaKV (arXiv 2502.03805): CriticalKV's two-stage selection inside AdaKV's head-adaptive budgets.

Reference NVIDIA/kvpress `presses/criticalkv_press.py::CriticalAdaKVPress.compress`. With the inner method's
scores s, a budget of n tokens per kv head on average and KV kv heads, per (layer, row):

  1. AdaKV's allocation (`plans.head_adaptive_keep`, as `lacax.cache.adakv`): every head's n_safe =
     max(1, int(n * alpha_safeguard)) best tokens are forced, and the KV * n best of the layer (forced first)
     give each head h its budget n_h (kvpress's `head_budgets`);
  2. stage one: head h keeps its int(n_h * first_stage_ratio) best tokens by s (forced first);
  3. stage two: every other token is scored (s + epsilon) * ||W_o v||_1 (`plans.value_weighted`, as
     `lacax.cache.criticalkv`), and head h keeps its n_h best by that (stage-one and forced tokens first).

The forced and stage-one tokens rank first in stage two (kvpress gives them (finfo.max + epsilon) * ||W_o v||_1,
which puts them first unless a value norm is below about 1e-30). ||W_o v||_1 is recorded by the forward
(`StatsRecording(value_norm=True)`), as for CriticalKV. Ties go to the older token, then to the lower head.
Batches: kvpress counts `head_budgets` over the whole batch (one `scatter_add_` over every row's top indices),
so at batch > 1 every row is given the heads' budgets summed over all rows; lacax allocates per row (the batch-1
definition, which the parity check runs).

Memory. kvpress keeps the whole cache and masks the evicted keys (`module.masked_key_indices`, the fake keys
of `attention_patch.py`), so it saves no memory and needs a non-eager attention; lacax packs each head's kept
tokens to the front of the layer's slot axis and cuts it to the largest head's count (at most
KV * n - (KV - 1) * n_safe, as AdaKV; see `lacax.cache.adakv`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import CachePolicy, HeadAdaptiveWrapper, ValueNormWrapper
from lacax.cache.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class CriticalAdaKVPolicy(ValueNormWrapper, HeadAdaptiveWrapper):
  """CriticalAdaKV: `budget` tokens per kv head on average (AdaKV's allocation), each head's share chosen by
  CriticalKV's two stages (see the module docstring).

  It compresses when the inner policy would (the prefill hand-off for a prompt compressor or a prefill-time
  scorer, every step for a decode-time one); after a prefill-only hand-off the decode cache records nothing.

  Attributes:
    inner: the scorer policy (any policy defining `keep_scores`; kvpress: any ScorerPress).
    budget: mean tokens kept per kv head (kvpress: int(k_len * (1 - compression_ratio))).
    alpha_safeguard: fraction of the budget every head keeps by its own ranking (0.2, kvpress), in [0, 1].
    epsilon: added to the inner score before the re-weighting (1e-4, kvpress).
    first_stage_ratio: fraction of each head's budget chosen by the inner score alone (0.5, kvpress), in [0, 1].
    lean_decode: after a prefill-only hand-off the decode cache records nothing (False inside a composition
      whose other policy still reads the recordings).
  """

  inner: CachePolicy
  budget: int
  alpha_safeguard: float = 0.2
  epsilon: float = 1e-4
  first_stage_ratio: float = 0.5
  lean_decode: bool = True

  def __post_init__(self):
    self._check_inner("CriticalAdaKV")
    plans.check_int("CriticalAdaKV", "budget", self.budget, 1)
    plans.check_number("CriticalAdaKV", "alpha_safeguard", self.alpha_safeguard, 0, 1)
    plans.check_number("CriticalAdaKV", "first_stage_ratio", self.first_stage_ratio, 0, 1)
    plans.check_number("CriticalAdaKV", "epsilon", self.epsilon, 0)

  def keep_mask(self, cache: KVCache) -> jax.Array:
    scores, protected = self.inner.keep_scores(cache)
    second = plans.value_weighted(scores, cache, self.epsilon, "CriticalAdaKV")
    valid = cache.valid()
    forced, allocated = plans.head_adaptive_keep(scores, protected, valid, self.budget, self.n_safe)
    head_budget = jnp.sum(allocated, axis=2, keepdims=True, dtype=jnp.int32)  # [L, B, 1, KV]
    # kvpress: (head_budgets * first_stage_ratio).to(torch.int64), a float32 product truncated.
    first_budget = (head_budget.astype(jnp.float32) * jnp.float32(self.first_stage_ratio)).astype(jnp.int32)
    first = valid & (plans.descending_rank(jnp.where(forced, jnp.inf, scores.astype(jnp.float32)), valid)
                     < first_budget)
    merged = jnp.where(first | forced, jnp.inf, second)
    return valid & (plans.descending_rank(merged, valid) < head_budget)
