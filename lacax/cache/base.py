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

`ScorerPolicy` is kvpress's `ScorerPress` (score every held token per KV head, keep the top budget) for the
scorer methods (Knorm, Random, KeyDiff, LagKV, CUR, LeverageScore, Q-Filter, ExpectedAttention); its
`score(cache) -> [L, B, S, KV]` is the plug point for head-adaptive and chunking wrappers.

Adding a method: one module `lacax/cache/<method>.py` defining a `CachePolicy` subclass (built from the shared
helpers in `lacax.cache.plans`, never from a sibling method module) and one entry in `lacax.cache.registry`.
The layout follows NVIDIA/kvpress (`kvpress/presses/`: one press per file, shared helpers in one place, one
contract test over every press).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.kv_cache import KVCache, gather_slots, init_cache
from lacax.model import rope as rope_lib
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


@flax.struct.dataclass
class ScorerState:
  """`KVCache.state` of a `ScorerPolicy`.

  Attributes:
    inv_freq: [head_dim // 2] float32 RoPE inverse frequencies of the model (scaling applied), so that
      `compact`, which sees only the cache, can score keys rotated at their original positions (as kvpress,
      whose cache holds post-RoPE keys) although lacax caches them before RoPE.
  """

  inv_freq: jax.Array


class ScorerPolicy(CachePolicy):
  """NVIDIA/kvpress's `ScorerPress` as a lacax policy: score every held token, keep the top `budget`.

  kvpress `presses/scorer_press.py::ScorerPress.compress` scores every prompt token per KV head
  (`score(...) -> [batch, kv_heads, seq]`, higher = keep) and keeps the top `int(k_len * (1 - ratio))` by
  score in each KV head, at prefill only. lacax keeps the top `budget` per (layer, row, KV head), in slot order
  (ties: the older token, see `lacax.cache.plans`):

  * prefill-time (`during_decode=False`, kvpress's behaviour): the prefill hand-off (`compact(cache,
    capacity)`) compresses a prompt longer than `budget`; decode steps append without eviction, so the decode
    cache needs `budget + max_new_tokens` slots (`max_new_tokens=None` sizes it for the whole run);
  * decode-time (`during_decode=True`): every compaction call rescores the held tokens and evicts down to
    `budget` (H2O-style streaming; the decode cache has budget + 1 slots).

  Subclasses are frozen dataclasses with the fields `budget`, `during_decode`, `rope_mode` and
  `max_new_tokens`, and implement `score(cache) -> [L, B, S, KV] float32` (meaningful at occupied slots), built
  on a plain per-head function of their module (`score_heads(keys [..., S, D], ...) -> [..., S]`) that
  wrappers (head-adaptive budgets, chunking) and parity tests call directly. A policy that needs the keys
  rotated (kvpress scores post-RoPE cache keys) gets them from `lacax.cache.plans.scoring_keys` with the RoPE
  frequencies of `ScorerState`.
  """

  def _validate(self, owner: str) -> None:
    plans.check_int(owner, "budget", self.budget, 1)
    if not isinstance(self.during_decode, bool):
      raise ValueError(f"{owner} during_decode={self.during_decode!r} must be True or False")
    if self.max_new_tokens is not None:
      plans.check_int(owner, "max_new_tokens", self.max_new_tokens, 0)
    if self.rope_mode not in plans.ROPE_MODES:
      raise ValueError(f"{owner} rope_mode={self.rope_mode!r} must be one of {list(plans.ROPE_MODES)}")

  def score(self, cache: KVCache) -> jax.Array:
    """[L, B, S, KV] float32 importance of every slot (higher = keep; empty slots: any value)."""
    raise NotImplementedError

  def init_state(self, cfg: ModelConfig) -> ScorerState:
    return ScorerState(inv_freq=jnp.asarray(rope_lib.inv_frequencies(cfg), jnp.float32))

  def inv_freq(self, cache: KVCache) -> jax.Array:
    """The RoPE frequencies the cache's state carries (it must come from this policy's `init`)."""
    if not isinstance(cache.state, ScorerState):
      raise ValueError(f"{type(self).__name__}.compact needs a cache built by its init() (state is "
                       f"{type(cache.state).__name__}, expected ScorerState)")
    return cache.state.inv_freq

  @property
  def compacts_in_decode(self) -> bool:
    return self.during_decode

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    if self.during_decode:
      return min(max_tokens, self.budget + 1)
    if self.max_new_tokens is None:
      return max_tokens
    return min(max_tokens, self.budget + self.max_new_tokens)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.full(cfg.num_layers, min(seen, self.budget))

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """Keeps the top-`budget` tokens of every (layer, row, KV head) holding more (prefill hand-off, and every
    call with `during_decode`); a call without `capacity` of a prefill-time policy returns the cache."""
    if capacity is None and not self.during_decode:
      return cache
    self.inv_freq(cache)

    def plan(c: KVCache) -> jax.Array:
      return plans.topk_keep_plan(self.score(c), c.valid(), self.budget, None, capacity or c.capacity)

    return plans.apply_plan(cache, plan, jnp.any(plans.occupancy(cache) > self.budget), capacity)
