"""The cache-policy interface every method module implements.

A policy is a frozen, hashable dataclass (a static jit argument) with pure functions over `KVCache`:

  decode_capacity(cfg, max_tokens) -> int
                             the static number of slots of the decode-phase cache of a run that feeds
                             `max_tokens` tokens in all (the full cache needs them all; a compacting policy
                             needs its budget plus one decode token);
  init(cfg, batch, capacity) -> KVCache
  compact(cache, capacity=None) -> KVCache
                             called after every forward; chooses what to keep (a no-op while within budget).
                             With `capacity`, the result has that many slots: a long prompt is prefilled
                             into a large cache and compacted once into the smaller decode cache (the
                             "prefill hand-off").

and three declarations the contract test (`tests/test_cache_contract.py`) checks every registered policy
against:

  max_held(cfg, seen) -> [L] ints   the most tokens a (row, kv head) of each layer holds right after a
                             compaction call that followed `seen` tokens;
  sink_tokens                the leading tokens [0, sink_tokens) every layer keeps (attention sinks);
  compacts_in_decode         whether decode-step calls (no `capacity`) evict; False for policies that only
                             compress the prompt, whose decode cache then grows by one token per step.

Content-agnostic policies (full, streaming, ladder) set `score_mode=None`, so the forward never materialises
attention statistics for them; score-based ones (H2O, TOVA, SnapKV, PyramidKV, KVMerger) name the statistic
they consume and the cache records it.

Adding a method: one module `lacax/cache/<method>.py` defining a `CachePolicy` subclass (built from the shared
helpers in `lacax.cache.plans`, never from a sibling method module) and one entry in `lacax.cache.registry`.
The layout follows NVIDIA/kvpress (`kvpress/presses/`: one press per file, shared helpers in one place, one
contract test over every press).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.kv_cache import KVCache, gather_slots, init_cache
from lacax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """Base class: subclasses implement `decode_capacity`, `compact` and `max_held`.

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

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    """Static slot count of the decode-phase cache of a run that feeds `max_tokens` tokens in all."""
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

  # Contract declarations (see the module docstring).

  @property
  def sink_tokens(self) -> int:
    return 0

  @property
  def compacts_in_decode(self) -> bool:
    return True

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    """[num_layers] int: the most tokens a (row, kv head) of each layer holds after a compaction call that
    followed `seen` tokens (for a policy that does not compact in decode: the prefill hand-off)."""
    raise NotImplementedError


class BudgetPolicy(CachePolicy):
  """A policy that holds at most `budget` tokens per (row, kv head) after every compaction (StreamingLLM, H2O,
  TOVA): its decode cache needs the budget plus the token of the current step. `budget` is a field or property
  of the subclass."""

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return min(max_tokens, self.budget + 1)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.full(cfg.num_layers, min(seen, self.budget))


def resize(cache: KVCache, capacity: int | None) -> KVCache:
  """The cache with `capacity` slots, keeping slots [0, capacity) (no-op when capacity is None or unchanged)."""
  if capacity is None or capacity == cache.capacity:
    return cache
  src = jnp.arange(capacity, dtype=jnp.int32)
  src = jnp.where(src < cache.capacity, src, -1)[None, None, :, None]
  return gather_slots(cache, src, impl="reference")


class WindowScoredPolicy(CachePolicy):
  """SnapKV-style one-shot prompt compression: the base of SnapKV and PyramidKV (and any method that scores
  the prompt by the attention of its last `window` queries, pools the scores and keeps a top-k prefix).

  Subclasses are frozen dataclasses with the fields `capacity`, `window`, `kernel`, `pooling`, `score_agg`,
  `rope_mode` and `max_new_tokens`, and define the prefix budget per layer and row (`prefix_budget`) and its
  largest value (`max_kept`).
  """

  def _validate(self, owner: str) -> None:
    plans.check_int(owner, "capacity", self.capacity, 2)
    plans.check_int(owner, "window", self.window, 1)
    if self.window >= self.capacity:
      raise ValueError(f"{owner} window={self.window} must be < capacity={self.capacity} (the reference "
                       "asserts max_capacity_prompt - window_size > 0)")
    plans.check_int(owner, "kernel", self.kernel, 1)
    if self.kernel % 2 == 0:
      raise ValueError(f"{owner} kernel={self.kernel} must be odd (the reference's pooling with padding "
                       "kernel // 2 keeps the length only for odd kernels)")
    if self.pooling not in plans.POOLINGS:
      raise ValueError(f"{owner} pooling={self.pooling!r} must be one of {list(plans.POOLINGS)}")
    if self.max_new_tokens is not None:
      plans.check_int(owner, "max_new_tokens", self.max_new_tokens, 0)
    plans.check_rope_and_agg(owner, self)

  @property
  def score_mode(self) -> str:
    return f"window:{self.window}"

  @property
  def compacts_in_decode(self) -> bool:
    return False

  def max_kept(self) -> int:
    """The most prompt tokens a layer keeps after compression."""
    raise NotImplementedError

  def prefix_budget(self, num_layers: int, prompt_len: jax.Array) -> jax.Array:
    """[L] or [L, B] int32: prefix tokens kept besides the window, for prompts of `prompt_len` tokens."""
    raise NotImplementedError

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    if self.max_new_tokens is None:
      return max_tokens
    return min(max_tokens, self.max_kept() + self.max_new_tokens)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    if seen <= self.capacity:
      return np.full(cfg.num_layers, seen)
    return np.asarray(self.prefix_budget(cfg.num_layers, jnp.int32(seen))) + self.window

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """Compresses the prompt in the prefill hand-off (the call given `capacity`); decode calls keep all.

    The references compress only when the attention runs over the whole prompt (q_len == k_len); in lacax
    that is the one `compact(cache, capacity=decode_capacity)` that follows the prefill forward. A call
    without `capacity` (every decode step) returns the cache unchanged, so the decode cache grows.
    """
    if capacity is None:
      return cache
    plans.require_scores(type(self).__name__.removesuffix("Policy"), cache, self.score_mode)
    valid = cache.valid()
    window = plans.recent_mask(valid, self.window)
    prefix = valid & ~window
    pooled = plans.pool_scores(cache.scores, prefix, self.kernel, self.pooling)
    prompt_len = jnp.max(plans.occupancy(cache), axis=-1)  # [L, B]; every head holds the whole prompt
    budget = self.prefix_budget(cache.num_layers, prompt_len[0])
    src = plans.topk_keep_plan(pooled, valid, budget, window, capacity)
    return plans.apply_plan(cache, src, jnp.any(prompt_len > self.capacity), capacity)
