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

`target_compression_ratio` (kvpress's `CompressionRatioDecodingPress`): the target is not a fixed size but a
fraction of the tokens seen so far, max(1, int(seen * (1 - r))) with seen = the row's highest position + 1
(kvpress: the batch's). lacax evaluates it in int32 with 1 - r as the nearest fraction p / q of denominator at
most 2^15 (0.7 for r = 0.3), as (seen // q) p + (seen % q) p // q, which never overflows. This differs from
kvpress by float rounding: kvpress multiplies by the float64 value of 1 - r, which for r = 0.3 or 0.9 lies just
below 0.7 or 0.1, so its `int()` keeps one token fewer where seen (1 - r) is an integer in exact arithmetic
(r = 0.9, seen = 20: kvpress 1, lacax 2; r = 0.3: 34 of the seen values below 2000). Ratios that are binary
fractions (0.5, 0.25, 0.75, ...) agree everywhere. The decode cache holds the largest target of the run plus an
interval: `run_capacity` = max(prompt, target(prompt + new)) + compression_interval.
"""

from __future__ import annotations

import dataclasses
import fractions
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
    target_size: tokens kept per (layer, row, kv head) after a compression (2048 in kvpress); not read when
      `target_compression_ratio` is set (the registry still fills it from `cache.size`).
    compression_interval: decode steps between compressions (512 in kvpress).
    target_compression_ratio: None (a fixed `target_size`, kvpress's DecodingPress) or r in [0, 1): keep
      max(1, int(seen * (1 - r))) of the `seen` tokens (kvpress's CompressionRatioDecodingPress).
  """

  inner: CachePolicy
  target_size: int
  compression_interval: int = 512
  target_compression_ratio: float | None = None

  def __post_init__(self):
    self._check_inner("Decoding")
    plans.check_int("Decoding", "target_size", self.target_size, 1)
    plans.check_int("Decoding", "compression_interval", self.compression_interval, 1)
    r = self.target_compression_ratio
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1):
      raise ValueError(f"Decoding target_compression_ratio={r!r} must be None or a number in [0, 1) (the "
                       "fraction of the tokens seen that a compression removes; kvpress asserts 0 <= r < 1)")

  @property
  def _keep_fraction(self) -> fractions.Fraction:
    return fractions.Fraction(1 - self.target_compression_ratio).limit_denominator(1 << 15)

  def target_for(self, seen):
    """Tokens kept per (layer, row, kv head) by a compression after `seen` tokens (int or int array)."""
    if self.target_compression_ratio is None:
      return self.target_size if isinstance(seen, int) else jnp.full_like(seen, self.target_size)
    p, q = self._keep_fraction.numerator, self._keep_fraction.denominator
    if isinstance(seen, int):
      return max(1, seen * p // q)
    return jnp.maximum(1, (seen // q) * p + (seen % q) * p // q)  # = seen * p // q, in int32

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    if self.target_compression_ratio is None:
      return super().decode_capacity(cfg, max_tokens)
    return min(max_tokens, self.target_for(max_tokens) + self.compression_interval)

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    if self.target_compression_ratio is None:
      return super().run_capacity(cfg, prompt_tokens, new_tokens)
    total = prompt_tokens + new_tokens
    return min(total, max(prompt_tokens, self.target_for(total)) + self.compression_interval)

  def init_state(self, cfg: ModelConfig) -> DecodingState:
    return DecodingState(steps=jnp.zeros((), jnp.int32), inner=self.inner.init_state(cfg))

  def _state(self, cache: KVCache) -> DecodingState:
    if not isinstance(cache.state, DecodingState):
      raise ValueError(f"DecodingPolicy.compact needs a cache built by DecodingPolicy.init (state is "
                       f"{type(cache.state).__name__}, expected DecodingState)")
    return cache.state

  def compress(self, cache: KVCache) -> KVCache:
    """Down to the target per plane by the inner scores (the cache's state is the inner policy's)."""
    seen = jnp.max(cache.pos[0], axis=(1, 2)) + 1  # [B]: the row's highest position + 1 (layer 0 holds it)
    target = self.target_for(seen.astype(jnp.int32))[None, :, None, None]  # [1, B, 1, 1]

    def plan(c: KVCache) -> jax.Array:
      scores, protected = self.inner.keep_scores(c)
      valid = c.valid()
      keep = valid & (plans.descending_rank(ranked_scores(scores, protected), valid) < target)
      return plans.keep_mask_plan(keep, c.capacity)

    return plans.apply_plan(cache, plan, jnp.any(plans.occupancy(cache) > target[:, :, 0, :]), None)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    state = self._state(cache)
    if capacity is not None:  # the hand-off: no compression (kvpress's DecodingPress skips the prefill)
      return resize(cache, capacity).replace(state=state.replace(steps=jnp.zeros((), jnp.int32)))
    steps = state.steps + 1
    due = steps >= self.compression_interval
    inner_cache = cache.replace(state=state.inner)
    out = jax.lax.cond(due, self.compress, lambda c: c, inner_cache)
    return out.replace(state=DecodingState(steps=jnp.where(due, 0, steps), inner=out.state))
