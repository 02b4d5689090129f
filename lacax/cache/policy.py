"""The cache-policy interface, and the full (never evicting) cache.

A policy is a frozen, hashable dataclass (a static jit argument) with pure functions over `KVCache`:

  slots(cfg, max_tokens) -> int
                             the static capacity of the decode-phase cache of a run that feeds `max_tokens`
                             tokens in all (the full cache needs them all; a compacting policy needs its
                             budget plus one decode token);
  init(cfg, batch, capacity) -> KVCache
  compact(cache, capacity=None) -> KVCache
                             called after every forward; chooses what to keep (a no-op while within budget).
                             With `capacity`, the result has that many slots: a long prompt is prefilled
                             into a large cache and compacted once into the smaller decode cache.

Content-agnostic policies (full, streaming, ladder) set `score_mode=None`, so the forward never materialises
attention statistics for them; score-based ones (H2O, TOVA, SnapKV, PyramidKV, KVMerger) name the statistic
they consume and the cache records it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lacax.cache.kv_cache import ROPE_MODES, KVCache, gather_slots, init_cache
from lacax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """Base class: subclasses implement `slots` and `compact`.

  `rope_mode`, `score_mode` and `score_agg` are plain class attributes here (not dataclass fields), so a
  subclass may declare any of them as its own field, property or constant without shifting its positional
  fields.
  """

  rope_mode = "slot"
  score_mode = None
  score_agg = "mean"

  @property
  def name(self) -> str:
    return type(self).__name__.removesuffix("Policy").lower()

  def slots(self, cfg: ModelConfig, max_tokens: int) -> int:
    raise NotImplementedError

  def init_state(self, cfg: ModelConfig):
    del cfg
    return None

  def init(self, cfg: ModelConfig, batch_size: int, capacity: int, *, dtype=None) -> KVCache:
    """An empty cache of `capacity` slots read and scored the way this policy needs."""
    return init_cache(cfg, batch_size, capacity, dtype=dtype, rope_mode=self.rope_mode,
                      score_mode=self.score_mode, score_agg=self.score_agg, state=self.init_state(cfg))

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class FullPolicy(CachePolicy):
  """Keeps every token: capacity is the total number of tokens the run will feed.

  Attributes:
    capacity: fixed slot count, or 0 to size the cache from the run (prompt + generated tokens).
    rope_mode: "slot" (default: pre-RoPE keys rotated when read, as DESIGN.md asks; slots are positions here,
      so "original" is the same) or "stored" (keys cached post-RoPE: no rotation pass over the cache per
      decode step, the fast choice for long contexts; see `lacax.cache.kv_cache`).
  """

  capacity: int = 0
  rope_mode: str = "slot"

  def __post_init__(self):
    if self.capacity < 0:
      raise ValueError(f"full cache capacity={self.capacity} must be >= 0 (0 = sized from the run)")
    if self.rope_mode not in ROPE_MODES:
      raise ValueError(f"FullPolicy.rope_mode={self.rope_mode!r} must be one of {list(ROPE_MODES)}")

  def slots(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return self.capacity or max_tokens

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    return resize(cache, capacity)


def resize(cache: KVCache, capacity: int | None) -> KVCache:
  """The cache with `capacity` slots, keeping slots [0, capacity) (no-op when capacity is None or unchanged)."""
  if capacity is None or capacity == cache.capacity:
    return cache
  src = jnp.arange(capacity, dtype=jnp.int32)
  src = jnp.where(src < cache.capacity, src, -1)[None, None, :, None]
  return gather_slots(cache, src, impl="reference")
