"""Decoding-time compression over any scorer policy (kvpress's DecodingPress).

Reference NVIDIA/kvpress `kvpress/presses/decoding_press.py::DecodingPress`: nothing happens at prefill; during
decoding, every `compression_interval` steps each layer is compressed down to `target_size` tokens by the base
press's scores. lacax counts decode steps in the cache state and, when the count reaches the interval,
keeps per (layer, row, kv head) the inner policy's protected tokens and best-scored ones, `target_size` in
all (a plane already within the target is left alone), then restarts the count.

Differs from kvpress by definition: kvpress re-scores at the compression step from a buffer of the last
`hidden_states_buffer_size` (256) decode hidden states (for SnapKV: their queries' attention). lacax scores
with the statistic the cache records at every step (the inner policy's `score_mode`): H2O's accumulated
attention, TOVA's last query; a window statistic ("window:W", SnapKV / PyramidKV) recorded one decode token
at a time holds the attention of the last query only. The decode cache must hold the prompt until the first
compression: `run_capacity` = max(prompt, target_size) + compression_interval.
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


@flax.struct.dataclass
class DecodingState:
  """steps: int32 decode steps since the last compression; inner: the inner policy's own state."""

  steps: jax.Array
  inner: Any = None


@dataclasses.dataclass(frozen=True)
class DecodingPolicy(IntervalDecodeWrapper):
  """Every `compression_interval` decode steps, compress to `target_size` tokens per kv head by `inner`.

  Attributes:
    inner: the scorer policy (its statistic must be recorded at decode: H2O, TOVA, StreamingLLM, ...).
    target_size: tokens kept per (layer, row, kv head) after a compression (2048 in kvpress).
    compression_interval: decode steps between compressions (512 in kvpress).
  """

  inner: CachePolicy
  target_size: int
  compression_interval: int = 512

  def __post_init__(self):
    self._check_inner("Decoding")
    plans.check_int("Decoding", "target_size", self.target_size, 1)
    plans.check_int("Decoding", "compression_interval", self.compression_interval, 1)

  def init_state(self, cfg: ModelConfig) -> DecodingState:
    return DecodingState(steps=jnp.zeros((), jnp.int32), inner=self.inner.init_state(cfg))

  def _state(self, cache: KVCache) -> DecodingState:
    if not isinstance(cache.state, DecodingState):
      raise ValueError(f"DecodingPolicy.compact needs a cache built by DecodingPolicy.init (state is "
                       f"{type(cache.state).__name__}, expected DecodingState)")
    return cache.state

  def compress(self, cache: KVCache) -> KVCache:
    """Down to `target_size` per plane by the inner scores (the cache's state is the inner policy's)."""
    def plan(c: KVCache) -> jax.Array:
      scores, protected = self.inner.keep_scores(c)
      valid = c.valid()
      keep = valid & (plans.descending_rank(ranked_scores(scores, protected), valid) < self.target_size)
      return plans.keep_mask_plan(keep, c.capacity)

    return plans.apply_plan(cache, plan, jnp.any(plans.occupancy(cache) > self.target_size), None)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    state = self._state(cache)
    if capacity is not None:  # the hand-off: no compression (kvpress's DecodingPress skips the prefill)
      return resize(cache, capacity).replace(state=state.replace(steps=jnp.zeros((), jnp.int32)))
    steps = state.steps + 1
    due = steps >= self.compression_interval
    inner_cache = cache.replace(state=state.inner)
    out = jax.lax.cond(due, self.compress, lambda c: c, inner_cache)
    return out.replace(state=DecodingState(steps=jnp.where(due, 0, steps), inner=out.state))
