"""Per-layer budgets over any scorer policy (kvpress's PerLayerCompressionPress).

Reference NVIDIA/kvpress `kvpress/presses/per_layer_compression_press.py`: the inner press runs in every layer
with that layer's own compression ratio. lacax budgets are token counts, so the wrapper takes one budget per
layer (kvpress's ratio r_l on a P-token prompt is the budget P (1 - r_l)).

Memory: every layer holds the same static number of slots, the largest budget; layers with smaller budgets
leave empty slots (as PyramidKV's pyramid does in lacax).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy, SelectingWrapper, ranked_scores
from lacax.cache.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class PerLayerPolicy(SelectingWrapper):
  """Each layer l keeps `budgets[l]` tokens per kv head: the inner policy's protected tokens, then its best.

  Attributes:
    inner: the scorer policy (its scores and protection are used, its own budget is not).
    budgets: one positive token budget per layer (a tuple whose length is the model's layer count), or a
      single budget for every layer.
  """

  inner: CachePolicy
  budgets: tuple[int, ...]

  def __post_init__(self):
    self._check_inner("PerLayer")
    try:
      budgets = tuple(self.budgets)
    except TypeError as e:
      raise ValueError(f"PerLayer budgets={self.budgets!r} must be a sequence of ints, one per layer") from e
    if not budgets:
      raise ValueError("PerLayer budgets=() must hold one budget per layer")
    for i, b in enumerate(budgets):
      plans.check_int("PerLayer", f"budgets[{i}]", b, 1)
    object.__setattr__(self, "budgets", tuple(int(b) for b in budgets))

  def _budgets(self, num_layers: int) -> np.ndarray:
    if len(self.budgets) == 1:
      return np.full(num_layers, self.budgets[0], np.int64)
    if len(self.budgets) != num_layers:
      raise ValueError(f"PerLayer budgets has {len(self.budgets)} entries but the model has {num_layers} layers; "
                       "give one budget per layer")
    return np.asarray(self.budgets, np.int64)

  def init(self, cfg, batch_size: int, capacity: int, *, dtype=None) -> KVCache:
    self._budgets(cfg.num_layers)
    return super().init(cfg, batch_size, capacity, dtype=dtype)

  def layer_bounds(self, cfg) -> np.ndarray:
    return self._budgets(cfg.num_layers)

  def _per_layer(self, cache: KVCache) -> jax.Array:
    return jnp.asarray(self._budgets(cache.num_layers), jnp.int32)[:, None, None, None]

  def over_budget(self, cache: KVCache) -> jax.Array:
    return jnp.any(plans.occupancy(cache) > self._per_layer(cache)[..., 0])

  def keep_mask(self, cache: KVCache) -> jax.Array:
    scores, protected = self.inner.keep_scores(cache)
    valid = cache.valid()
    rank = plans.descending_rank(ranked_scores(scores, protected), valid)
    return valid & (protected | (rank < self._per_layer(cache)))
