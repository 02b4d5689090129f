"""The full cache: never evicts; the reference every compacting policy is measured against."""

from __future__ import annotations

import dataclasses

import numpy as np

from lacax.cache.base import CachePolicy, resize
from lacax.cache.kv_cache import ROPE_MODES, KVCache
from lacax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FullPolicy(CachePolicy):
  """Keeps every token: the decode capacity is the total number of tokens the run will feed.

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

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return self.capacity or max_tokens

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.full(cfg.num_layers, seen if not self.capacity else min(seen, self.capacity))

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    return resize(cache, capacity)
