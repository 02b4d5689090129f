"""Score-based eviction baselines: H2O, TOVA, SnapKV and PyramidKV, per KV head (GQA-aware).

These policies keep the tokens that attention singles out, so the forward records a per-slot statistic for
them in `cache.scores` [L, B, S, KV] (`score_mode` names which one, `score_agg` how the query heads of a GQA
group are reduced to their KV head; see `lacax.cache.kv_cache`). Every policy turns those scores into a keep
plan with one shared helper, `topk_keep_plan`, and applies it with `gather_slots` (through `apply_plan`, which
skips the gather when nothing has to go).

  H2O        "accumulate": attention summed over every query so far; every compact (prefill and decode) once
             a head holds more than heavy + recent tokens; per KV head.
  TOVA       "last": the step's last query; every compact once a layer holds more than `budget` keys; one
             keep set per layer, shared by its heads.
  SnapKV     "window:W": the last W queries of the prompt, summed and 1-D pooled; once, in the prefill
             hand-off, when the prompt is longer than `capacity`; per KV head.
  PyramidKV  as SnapKV, with a budget per layer running linearly from layer 0 (largest) to the last.

Common conventions (and where they differ from the references, which all run at batch 1 on MHA caches):

* **GQA.** The references score query heads (they `repeat_kv` the cache). lacax scores KV heads: the forward
  reduces the G query heads of a group with `score_agg` ("mean" by default, as NVIDIA/kvpress and
  KVCache-Factory's `--kv_cache_granularity kv_head --gqa_score_agg mean`). For "mean" and "sum" this is the
  reference statistic reduced over the group. For "max" the forward reduces the group *per query* and then
  sums over queries (sum_t max_g); KVCache-Factory's kv_head mode sums over the window first (max_g sum_t).
* **Batch.** Every (layer, row, KV head) is planned independently, so right-padded rows of different prompt
  lengths are handled exactly as separate batch-1 runs (the H2O reference sums scores over the batch axis).
* **Order.** Kept tokens stay in their original slot order, so occupied slots remain front-packed and in time
  order. The references concatenate top-k indices in top-k order (TOVA, SnapKV, PyramidKV) or sorted (H2O);
  with keys at their original positions attention does not depend on the slot order, so this changes nothing
  but makes "the most recent r tokens" simply the last r occupied slots.
* **Ties** in a top-k are broken toward the **older** token (the smaller slot index, i.e. the smaller original
  position since slots are in time order); `torch.topk` leaves the tie order unspecified.
* **Positions.** `rope_mode="original"` (default) rotates kept keys at their original positions, as the H2O
  and SnapKV real-drop code and kvpress do (they cache post-RoPE keys); `rope_mode="slot"` re-rotates them at
  their new slot (the StreamingLLM position shift) instead; `rope_mode="stored"` caches them post-RoPE, as
  those references do (same attention as "original", no per-step rotation of the cache).

Cache sizing. `slots(cfg, max_tokens)` is the static capacity of the decode-phase cache of a run that feeds
`max_tokens` tokens in all (prompt + generated, as `lacax.generate` calls it). H2O and TOVA never hold more
than budget + 1 tokens (the budget plus the token of the current step). SnapKV and PyramidKV only compress the
prompt and let the decode cache grow, so their decode cache must also hold every generated token: set
`max_new_tokens` on the policy to size it as (kept prompt tokens) + max_new_tokens; left at None it is sized
for the whole run (always enough, but as large as the full cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import ROPE_MODES, SCORE_AGGS, KVCache
from lacax.cache.policies import apply_plan
from lacax.cache.policy import CachePolicy
from lacax.model.config import ModelConfig

POOLINGS = ("avg", "max")


# ----------------------------------------------------------------------------------------------------------------
# Plan helpers (pure jnp, static shapes).
# ----------------------------------------------------------------------------------------------------------------


def _per_plane(count, ndim: int = 4):
  """A count given as a Python int, [L] or [L, B] array, shaped to broadcast against [L, B, S, KV]."""
  if isinstance(count, (int, np.integer)):
    return int(count)
  count = jnp.asarray(count, jnp.int32)
  if count.ndim > 2:
    raise ValueError(f"a keep count must be an int, [layers] or [layers, batch]; got shape {count.shape}")
  return count.reshape(count.shape + (1,) * (ndim - count.ndim))


def recent_mask(valid: jax.Array, count) -> jax.Array:
  """The `count` most recent occupied slots of every (layer, row, kv head).

  Slots hold tokens in time order, so these are the last `count` occupied slots (holes allowed).

  Args:
    valid: [L, B, S, KV] bool, the slot holds a token.
    count: int, [L] or [L, B] int: how many to mark.

  Returns:
    [L, B, S, KV] bool.
  """
  # Occupied slots at index >= s; a slot is among the `count` newest iff at most `count` of them remain.
  at_or_after = jnp.flip(jnp.cumsum(jnp.flip(valid, axis=2), axis=2, dtype=jnp.int32), axis=2)
  return valid & (at_or_after <= _per_plane(count))


def topk_keep_plan(scores: jax.Array, valid: jax.Array, keep_count, protected: jax.Array | None,
                   out_capacity: int) -> jax.Array:
  """Keep plan: every protected token plus the `keep_count` best-scored other tokens, in slot order.

  Args:
    scores: [L, B, S, KV] float, higher = more worth keeping (any KV may be 1 for a plan shared by the heads).
    valid: [L, B, S, KV] bool, the slot holds a token.
    keep_count: how many unprotected tokens to keep by score: a static int, or an int array of shape [L]
      (per-layer budgets) or [L, B] (per layer and row). Fewer are kept where fewer exist.
    protected: [L, B, S, KV] bool or None: tokens kept regardless of score (the recent window); only where
      valid.
    out_capacity: static number of output slots; must be >= the number of kept tokens (the newest kept tokens
      would be cut off otherwise).

  Returns:
    src: [L, B, out_capacity, KV] int32 for `gather_slots`: the kept source slots in increasing slot order
    (occupied slots stay front-packed and in time order), then -1. Ties in score are broken toward the older
    token (the smaller slot index). Cost: two argsorts and one sort over S per (layer, row, head).
  """
  num_slots = scores.shape[2]
  protected = valid & protected if protected is not None else jnp.zeros_like(valid)
  candidate = valid & ~protected
  # Ascending stable argsort of -score: best first, equal scores in slot order (older first); non-candidates
  # (+inf) last.
  key = jnp.where(candidate, -scores.astype(jnp.float32), jnp.inf)
  order = jnp.argsort(key, axis=2, stable=True)
  rank = jnp.argsort(order, axis=2)  # inverse permutation: the rank of every slot
  keep = protected | (candidate & (rank < _per_plane(keep_count)))
  slot = jnp.arange(num_slots, dtype=jnp.int32)[None, None, :, None]
  packed = jnp.sort(jnp.where(keep, slot, num_slots), axis=2)  # kept slots ascending, then num_slots
  if out_capacity <= num_slots:
    packed = packed[:, :, :out_capacity]
  else:
    pad = [(0, 0), (0, 0), (0, out_capacity - num_slots), (0, 0)]
    packed = jnp.pad(packed, pad, constant_values=num_slots)
  return jnp.where(packed < num_slots, packed, -1).astype(jnp.int32)


def pool_scores(scores: jax.Array, mask: jax.Array, kernel: int, pooling: str) -> jax.Array:
  """SnapKV's 1-D pooling of scores over the slot axis, restricted to the slots in `mask`.

  Equals `F.avg_pool1d(x, kernel, padding=kernel // 2, stride=1)` (zero padding counted in the mean) or
  `F.max_pool1d(...)` (padding never wins) applied to the masked run of slots alone: slots outside `mask` act
  as the reference's padding. For the contiguous prefix [0, n - window) of a prefilled row this is exactly the
  reference, which pools `attn[..., :-window]`.

  Args:
    scores: [L, B, S, KV] float32.
    mask: [L, B, S, KV] bool, the slots being pooled.
    kernel: odd window width.
    pooling: "avg" or "max".

  Returns:
    [L, B, S, KV] float32 (meaningful at the masked slots only).
  """
  pad = [(0, 0), (0, 0), (kernel // 2, kernel // 2), (0, 0)]
  window, strides = (1, 1, kernel, 1), (1, 1, 1, 1)
  if pooling == "avg":
    x = jnp.where(mask, scores, 0.0)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad) / kernel
  x = jnp.where(mask, scores, -jnp.inf)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pad)


def pyramid_budgets(num_layers: int, capacity: int, window: int, beta: int, prompt_len) -> jax.Array:
  """PyramidKV's per-layer prefix budgets (tokens kept besides the window), as KVCache-Factory computes them.

  Reference `pyramidkv/pyramidkv_utils.py::PyramidKVCluster.update_kv`, with P = prompt length, w = window,
  c = capacity - w:

    min = c // beta, max = 2c - min; if max >= P - w: max = P - w, min = 2c - max
    steps = (max - min) // (num_layers - 1); budget(layer) = max - layer * steps
    P < capacity:      no compression (every prefix token kept; here: budget = P - w, clipped at 0)
    P < 2c:            the uniform SnapKV budget c for every layer (the reference's middle branch)
    otherwise:         budget(layer), layer 0 largest, linear down to ~min

  The mean budget is c + ((max - min) mod (num_layers - 1)) / 2, i.e. c up to integer rounding. With one layer
  the reference divides by zero; here that layer gets c.

  Args:
    num_layers, capacity, window, beta: static ints.
    prompt_len: int or [B] int array P.

  Returns:
    [num_layers] (int P) or [num_layers, B] int32.
  """
  c = capacity - window
  p = jnp.asarray(prompt_len, jnp.int32)
  min0 = c // beta
  capped = 2 * c - min0 >= p - window
  max_num = jnp.where(capped, p - window, 2 * c - min0)
  min_num = jnp.where(capped, 2 * c - (p - window), min0)
  layer = jnp.arange(num_layers, dtype=jnp.int32).reshape((num_layers,) + (1,) * p.ndim)
  if num_layers > 1:
    pyramid = max_num - layer * ((max_num - min_num) // (num_layers - 1))
  else:
    pyramid = jnp.full(layer.shape, c, jnp.int32)
  budget = jnp.where(p < 2 * c, c, pyramid)
  return jnp.where(p < capacity, jnp.maximum(p - window, 0), budget).astype(jnp.int32)


def occupancy(cache: KVCache) -> jax.Array:
  """[L, B, KV] int32 number of tokens each (layer, row, kv head) holds."""
  return jnp.sum(cache.valid(), axis=2, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------------------


def _check_int(owner: str, name: str, value, minimum: int) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
    raise ValueError(f"{owner} {name}={value!r} must be an integer")
  if value < minimum:
    raise ValueError(f"{owner} {name}={value} must be >= {minimum}")


def _check_common(owner: str, policy) -> None:
  if policy.score_agg not in SCORE_AGGS:
    raise ValueError(f"{owner} score_agg={policy.score_agg!r} must be one of {list(SCORE_AGGS)}")
  if policy.rope_mode not in ROPE_MODES:
    raise ValueError(f"{owner} rope_mode={policy.rope_mode!r} must be one of {list(ROPE_MODES)}")


def _require_scores(owner: str, cache: KVCache, score_mode: str) -> None:
  if cache.scores is None or cache.score_mode != score_mode:
    raise ValueError(f"{owner} needs a cache recording score_mode={score_mode!r}, got "
                     f"score_mode={cache.score_mode!r}; build the cache with the policy's init()")


# ----------------------------------------------------------------------------------------------------------------
# Policies.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class H2OPolicy(CachePolicy):
  """H2O (heavy-hitter oracle): the `recent` newest tokens + the `heavy` tokens with most accumulated attention.

  Reference FMInference/H2O `h2o_hf/utils_real_drop/modify_llama.py::H2OKVCache_LayerWise`: after every forward
  (prefill and each decode step) the attention each cached token received is added to its score (summed over
  all the step's queries, so over every query since the token arrived); when the cache holds more than
  heavy + recent tokens it keeps the last `recent` and the top-`heavy` of the older ones by score, per head.
  Scores travel with their tokens and are dropped with evicted ones (`gather_slots` gathers them).

  lacax scores per KV head (the group reduced with `score_agg`; the reference is per query head on MHA) and per
  batch row (the reference sums scores over the batch). Ties go to the older token.

  Attributes:
    heavy: heavy-hitter budget (>= 0).
    recent: recent-window budget (>= 0); heavy + recent >= 1.
    score_agg: GQA group reduction of the recorded attention: "mean", "max" or "sum".
    rope_mode: "original" (default, as the reference), "slot" or "stored" (post-RoPE keys).
  """

  heavy: int
  recent: int
  score_agg: str = "mean"
  rope_mode: str = "original"

  score_mode = "accumulate"

  def __post_init__(self):
    _check_int("H2O", "heavy", self.heavy, 0)
    _check_int("H2O", "recent", self.recent, 0)
    if self.heavy + self.recent < 1:
      raise ValueError(f"H2O heavy={self.heavy} + recent={self.recent} must be >= 1")
    _check_common("H2O", self)

  @property
  def budget(self) -> int:
    return self.heavy + self.recent

  def slots(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return min(max_tokens, self.budget + 1)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    _require_scores("H2O", cache, self.score_mode)
    def plan(c: KVCache) -> jax.Array:
      valid = c.valid()
      return topk_keep_plan(c.scores, valid, self.heavy, recent_mask(valid, self.recent), capacity or c.capacity)

    return apply_plan(cache, plan, jnp.any(occupancy(cache) > self.budget), capacity)


@dataclasses.dataclass(frozen=True)
class TOVAPolicy(CachePolicy):
  """TOVA (token omission via attention): keep the `budget` keys the newest query attends to most.

  Reference schwartz-lab-NLP/TOVA `src/tova_cache.py::TOVACache.reduce`: after every forward, if the layer holds
  more than `budget` keys, the last query's attention averaged over all heads selects the top-`budget` keys,
  and every head of the layer keeps that same set.

  lacax records the last query's attention per KV head (the group reduced with `score_agg`) and averages over
  the KV heads; with the default "mean" this is the reference's mean over all query heads. The plan is shared
  by the heads of a (layer, row). Ties go to the older token.

  Attributes:
    budget: keys kept per layer (>= 1).
    score_agg: GQA group reduction before the mean over KV heads ("mean" reproduces the reference).
    rope_mode: "original" (default: kept keys keep their positions), "slot" or "stored".
  """

  budget: int
  score_agg: str = "mean"
  rope_mode: str = "original"

  score_mode = "last"

  def __post_init__(self):
    _check_int("TOVA", "budget", self.budget, 1)
    _check_common("TOVA", self)

  def slots(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return min(max_tokens, self.budget + 1)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    _require_scores("TOVA", cache, self.score_mode)
    valid = jnp.any(cache.valid(), axis=-1, keepdims=True)  # [L, B, S, 1]; the heads hold the same tokens

    def plan(c: KVCache) -> jax.Array:  # [L, B, S_out, 1]
      scores = jnp.mean(c.scores, axis=-1, keepdims=True)
      return topk_keep_plan(scores, valid, self.budget, None, capacity or c.capacity)

    return apply_plan(cache, plan, jnp.any(jnp.sum(valid, axis=2) > self.budget), capacity)


class _WindowScored(CachePolicy):
  """SnapKV-style one-shot prompt compression; subclasses define the prefix budget per layer and row."""

  def _validate(self, owner: str) -> None:
    _check_int(owner, "capacity", self.capacity, 2)
    _check_int(owner, "window", self.window, 1)
    if self.window >= self.capacity:
      raise ValueError(f"{owner} window={self.window} must be < capacity={self.capacity} (the reference "
                       "asserts max_capacity_prompt - window_size > 0)")
    _check_int(owner, "kernel", self.kernel, 1)
    if self.kernel % 2 == 0:
      raise ValueError(f"{owner} kernel={self.kernel} must be odd (the reference's pooling with padding "
                       "kernel // 2 keeps the length only for odd kernels)")
    if self.pooling not in POOLINGS:
      raise ValueError(f"{owner} pooling={self.pooling!r} must be one of {list(POOLINGS)}")
    if self.max_new_tokens is not None:
      _check_int(owner, "max_new_tokens", self.max_new_tokens, 0)
    _check_common(owner, self)

  @property
  def score_mode(self) -> str:
    return f"window:{self.window}"

  def max_kept(self) -> int:
    """The most prompt tokens a layer keeps after compression."""
    raise NotImplementedError

  def prefix_budget(self, num_layers: int, prompt_len: jax.Array) -> jax.Array:
    """[L] or [L, B] int32: prefix tokens kept besides the window, for prompts of `prompt_len` tokens."""
    raise NotImplementedError

  def slots(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    if self.max_new_tokens is None:
      return max_tokens
    return min(max_tokens, self.max_kept() + self.max_new_tokens)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """Compresses the prompt in the prefill hand-off (the call given `capacity`); decode calls keep all.

    The references compress only when the attention runs over the whole prompt (q_len == k_len); in lacax
    that is the one `compact(cache, capacity=decode_capacity)` that follows the prefill forward. A call
    without `capacity` (every decode step) returns the cache unchanged, so the decode cache grows.
    """
    if capacity is None:
      return cache
    _require_scores(type(self).__name__.removesuffix("Policy"), cache, self.score_mode)
    valid = cache.valid()
    window = recent_mask(valid, self.window)
    prefix = valid & ~window
    pooled = pool_scores(cache.scores, prefix, self.kernel, self.pooling)
    prompt_len = jnp.max(occupancy(cache), axis=-1)  # [L, B]; every head holds the whole prompt
    budget = self.prefix_budget(cache.num_layers, prompt_len[0])
    src = topk_keep_plan(pooled, valid, budget, window, capacity)
    return apply_plan(cache, src, jnp.any(prompt_len > self.capacity), capacity)


@dataclasses.dataclass(frozen=True)
class SnapKVPolicy(_WindowScored):
  """SnapKV: compress the prompt to `capacity` tokens chosen by the attention of its last `window` queries.

  Reference FasterDecoding/SnapKV `snapkv/monkeypatch/snapkv_utils.py::SnapKVCluster.update_kv` (prefill only):
  if the prompt has P >= capacity tokens, the window queries' attention to the prefix [0, P - window) is summed
  over the window, pooled (`avg_pool1d` / `max_pool1d`, `kernel`, padding kernel // 2, stride 1) and the top
  (capacity - window) prefix tokens are kept with the whole window; a shorter prompt is left alone (P ==
  capacity keeps everything, so it is a no-op as well). Decoding appends without further eviction.

  lacax scores per KV head (group reduced with `score_agg`, as kvpress and KVCache-Factory's kv_head mode; the
  SnapKV repository works on query heads) and per row. Ties go to the older token.

  Attributes:
    capacity: prompt tokens kept (window included); > window.
    window: observation window w (32 in SnapKV's `init_snapkv`, 64 in the class default).
    kernel: odd pooling width (SnapKV's default is 5; 7 is KVCache-Factory's).
    pooling: "avg" (SnapKV's default) or "max".
    score_agg: GQA group reduction: "mean", "max" or "sum".
    rope_mode: "original" (default, as the reference's post-RoPE cache), "slot" or "stored".
    max_new_tokens: decode tokens the cache must leave room for (see `slots`); None sizes the decode cache
      for the whole run. Set it to at least the run's max_new_tokens: the forward drops (silently, being
      jitted) the keys of tokens written past the last slot.
  """

  capacity: int
  window: int = 32
  kernel: int = 7
  pooling: str = "avg"
  score_agg: str = "mean"
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("SnapKV")

  def max_kept(self) -> int:
    return self.capacity

  def prefix_budget(self, num_layers: int, prompt_len: jax.Array) -> jax.Array:
    del prompt_len
    return jnp.full((num_layers,), self.capacity - self.window, jnp.int32)


@dataclasses.dataclass(frozen=True)
class PyramidKVPolicy(_WindowScored):
  """PyramidKV: SnapKV scoring with per-layer budgets running linearly from layer 0 (largest) to the top.

  Reference Zefan-Cai/KVCache-Factory `pyramidkv/pyramidkv_utils.py::PyramidKVCluster.update_kv`; the budgets
  are `pyramid_budgets` (prefix tokens kept besides the window, mean ~ capacity - window). Every layer holds
  the same static number of slots, so layers with smaller budgets leave empty slots (pos -1) after their kept
  tokens: the memory is that of the largest layer, as in any static-shape implementation.

  Attributes: as `SnapKVPolicy`, plus
    beta: the pyramid's steepness: the smallest budget is (capacity - window) // beta (20 in the reference).
  """

  capacity: int
  window: int = 32
  kernel: int = 7
  pooling: str = "avg"
  beta: int = 20
  score_agg: str = "mean"
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("PyramidKV")
    _check_int("PyramidKV", "beta", self.beta, 1)

  def max_kept(self) -> int:
    # Layer 0's budget, 2c - c // beta, is the largest of every branch (c = capacity - window).
    c = self.capacity - self.window
    return 2 * c - c // self.beta + self.window

  def prefix_budget(self, num_layers: int, prompt_len: jax.Array) -> jax.Array:
    return pyramid_budgets(num_layers, self.capacity, self.window, self.beta, prompt_len)


__all__ = ["H2OPolicy", "TOVAPolicy", "SnapKVPolicy", "PyramidKVPolicy", "topk_keep_plan", "recent_mask",
           "pool_scores", "pyramid_budgets", "occupancy", "POOLINGS"]
