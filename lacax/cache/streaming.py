"""StreamingLLM (arXiv 2309.17453): attention sinks + a window of the most recent tokens.

Content-agnostic: the plan comes from slot indices alone, so the forward never materialises attention
statistics for it (`score_mode=None`) and any attention kernel works. Keys are rotated at their cache slot,
queries at their own slot (`rope_mode="slot"`, the reference's position shift). The plan is computed per batch
row (rows of a padded batch have different lengths) and applied with `lacax.cache.plans.apply_plan`, which
skips the gather on steps that evict nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import BudgetPolicy
from lacax.cache.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class StreamingPolicy(BudgetPolicy):
  """StreamingLLM: the first `start_size` tokens (attention sinks) + the most recent `recent_size` tokens.

  Reference: mit-han-lab/streaming-llm `streaming_llm/kv_cache.py::StartRecentKVCache` (evict after every
  step in the perplexity evaluation; 4 + 2000 in the demo, the LaCache comparisons use 4 + 252 for a 256 cache).
  Keys are cached pre-RoPE and rotated at their slot (`pos_shift/modify_llama.py`).
  """

  start_size: int = 4
  recent_size: int = 252
  rope_mode: str = "slot"

  def __post_init__(self):
    if self.start_size < 0:
      raise ValueError(f"streaming start_size={self.start_size} must be >= 0")
    if self.recent_size < 1:
      raise ValueError(f"streaming recent_size={self.recent_size} must be >= 1")
    if self.rope_mode not in ("slot", "original"):
      raise ValueError(f"streaming rope_mode={self.rope_mode!r} must be 'slot' or 'original'")

  @property
  def budget(self) -> int:
    return self.start_size + self.recent_size

  @property
  def sink_tokens(self) -> int:
    return self.start_size

  def keep_scores(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """Recency as a score (the original position: newer = higher); the `start_size` sinks protected. A
    wrapper's top-k by it keeps the sinks and the newest tokens (kvpress's StreamingLLMPress as a scorer)."""
    pos = cache.pos
    return pos.astype(jnp.float32), (pos >= 0) & (pos < self.start_size)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    out = capacity or cache.capacity
    length = cache.length[0]  # [B]; every layer holds the same count
    slot = jnp.arange(out, dtype=jnp.int32)[None, :]
    evicting = length[:, None] > self.budget
    recent_src = length[:, None] - self.recent_size + (slot - self.start_size)
    src = jnp.where(evicting & (slot >= self.start_size), recent_src, slot)
    src = jnp.where(slot < jnp.minimum(length[:, None], self.budget), src, -1)
    src = jnp.broadcast_to(src[None], (cache.num_layers,) + src.shape)
    return plans.apply_plan(cache, src, jnp.any(evicting), capacity)
