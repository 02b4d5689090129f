"""Content-agnostic compacting policies: StreamingLLM (sinks + recent window) and LaCache (the ladder).

Both decide what to keep from slot indices alone, so they never ask the forward for attention statistics
(`score_mode=None`) and work with any attention kernel. Both default to the position shift of their reference
code: keys are rotated at their cache slot, queries at their own slot (`rope_mode="slot"`).

The plans are computed per batch row (rows of a padded batch have different lengths) and applied with one
gather over the stacked cache (`gather_slots`, which picks the Pallas kernel on TPU/GPU). A step that needs no
compaction skips the gather through `lax.cond`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from lacax.cache import ladder as ladder_lib
from lacax.cache.kv_cache import KVCache, gather_slots
from lacax.cache.policy import CachePolicy, resize
from lacax.model.config import ModelConfig


def apply_plan(cache: KVCache, plan: jax.Array | Callable[[KVCache], jax.Array], needed: jax.Array,
               capacity: int | None) -> KVCache:
  """Gathers the plan ([L, B, S_out] or [L, B, S_out, KV]) when `needed`, else keeps (or resizes) the cache.

  `plan` may be the source-slot array or a function of the cache computing it; a function runs only in the
  branch that gathers, so a policy whose plan is expensive (top-k sorts) pays nothing on steps that keep
  everything. With a new `capacity` the gather always runs (the shapes differ, so there is nothing to skip).
  """

  def gather(c: KVCache) -> KVCache:
    src = plan(c) if callable(plan) else plan
    return gather_slots(c, src[..., None] if src.ndim == 3 else src)

  if capacity is not None and capacity != cache.capacity:
    return gather(cache)
  return jax.lax.cond(needed, gather, lambda c: c, cache)


@dataclasses.dataclass(frozen=True)
class StreamingPolicy(CachePolicy):
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

  def slots(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return min(max_tokens, self.budget + 1)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    out = capacity or cache.capacity
    length = cache.length[0]  # [B]; every layer holds the same count
    slot = jnp.arange(out, dtype=jnp.int32)[None, :]
    evicting = length[:, None] > self.budget
    recent_src = length[:, None] - self.recent_size + (slot - self.start_size)
    src = jnp.where(evicting & (slot >= self.start_size), recent_src, slot)
    src = jnp.where(slot < jnp.minimum(length[:, None], self.budget), src, -1)
    src = jnp.broadcast_to(src[None], (cache.num_layers,) + src.shape)
    return apply_plan(cache, src, jnp.any(evicting), capacity)


@dataclasses.dataclass(frozen=True)
class LadderPolicy(CachePolicy):
  """LaCache: the ladder-shaped KV cache with iterative compaction (arXiv 2507.14204).

  The plan comes from `lacax.cache.ladder.ladder_plan`, which reproduces GATECH-EIC/LaCache's index arithmetic
  exactly (modular layer phase, first-compaction size compensation, startovers). The same policy serves both
  protocols of the reference:

    * token-by-token streaming (`ppl/`): `compact` after every step;
    * one-shot (`LongBench/`, `niah/`): a long prompt is prefilled into a large cache, one `compact` (usually a
      multi-pass startover) shrinks it to the decode capacity, then decode compacts after every token. Build
      such a policy with `LadderPolicy.for_prefill`, which derives cache_size and start_size as the reference
      drivers do.

  The reference assumes batch 1; lacax keeps one planner state per batch row, so padded rows of different
  lengths are laddered independently.

  Attributes:
    span, overlap: S and O; with N layers they fix the ladder (B, A, R). Requires S < N and O < S.
    cache_size: C, the nominal budget in tokens per layer.
    start_size: s, attention sinks (4 in the reference's perplexity driver).
    layer_mapping: "modular" (the reference code, default) or "contiguous" (the paper's layer blocks).
    rope_mode: "slot" (the reference's position shift, default) or "original".
  """

  span: int = 16
  overlap: int = 0
  cache_size: int = 256
  start_size: int = 4
  layer_mapping: str = "modular"
  rope_mode: str = "slot"

  def __post_init__(self):
    # What needs no layer count is checked here; span < layers and the budget are checked by `ladder()` as soon
    # as the model is known (`init`), before anything is compiled.
    for name in ("span", "cache_size", "start_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ladder {name}={getattr(self, name)} must be positive")
    if not 0 <= self.overlap < self.span:
      raise ValueError(f"ladder overlap={self.overlap} must be in [0, span={self.span})")
    if self.layer_mapping not in ladder_lib.LAYER_MAPPINGS:
      raise ValueError(f"ladder layer_mapping={self.layer_mapping!r} must be one of {list(ladder_lib.LAYER_MAPPINGS)}")
    if self.rope_mode not in ("slot", "original"):
      raise ValueError(f"ladder rope_mode={self.rope_mode!r} must be 'slot' or 'original'")

  @classmethod
  def for_prefill(cls, cfg: ModelConfig, *, span: int, overlap: int, budget: float, prompt_len: int,
                  model_max_len: int | None = None, protocol: str = "longbench", **kwargs) -> "LadderPolicy":
    """The one-shot setup of the reference drivers (see `LadderConfig.for_prefill`)."""
    ladder = ladder_lib.LadderConfig.for_prefill(cfg.num_layers, span, overlap, budget, prompt_len,
                                                 model_max_len=model_max_len, protocol=protocol,
                                                 layer_mapping=kwargs.get("layer_mapping", "modular"))
    return cls(span=span, overlap=overlap, cache_size=ladder.cache_size, start_size=ladder.start_size, **kwargs)

  def ladder(self, num_layers: int) -> ladder_lib.LadderConfig:
    """The planner's config for a model of `num_layers` layers (validates span < layers and the budget)."""
    return ladder_lib.LadderConfig(num_layers=num_layers, span=self.span, overlap=self.overlap,
                                   cache_size=self.cache_size, start_size=self.start_size,
                                   layer_mapping=self.layer_mapping)

  def slots(self, cfg: ModelConfig, max_tokens: int) -> int:
    # The longest a layer gets right after an append: C + floor(R/2) + 1.
    return min(max_tokens, self.ladder(cfg.num_layers).stream_capacity)

  def init_state(self, cfg: ModelConfig) -> ladder_lib.LadderState:
    return ladder_lib.init_ladder_state(self.ladder(cfg.num_layers))

  def init(self, cfg: ModelConfig, batch_size: int, capacity: int, *, dtype=None) -> KVCache:
    cache = super().init(cfg, batch_size, capacity, dtype=dtype)
    # One planner state per batch row.
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch_size,) + x.shape), cache.state)
    return cache.replace(state=state)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    ladder = self.ladder(cache.num_layers)
    out = capacity or cache.capacity
    length = cache.length[0]  # [B]; the ladder keeps every layer at the same length
    src, _, state = jax.vmap(lambda s, n: ladder_lib.ladder_plan(ladder, s, n, out))(cache.state, length)
    src = jnp.transpose(src, (1, 0, 2))  # [B, N, out] -> [N, B, out]
    needed = jnp.any(length > cache.state.cache_size)
    return apply_plan(cache, src, needed, capacity).replace(state=state)


__all__ = ["StreamingPolicy", "LadderPolicy", "apply_plan", "resize"]
