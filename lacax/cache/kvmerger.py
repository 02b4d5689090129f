"""KVMerger (arXiv 2407.08454, "Model Tells You Where to Merge"): Gaussian-kernel merging of similar keys.

After the prefill forward, every (layer, row, kv head) of the cache is partitioned into *merging sets*: runs
of consecutive tokens whose adjacent keys are cosine-similar. Each set collapses into one slot: its pivot (the
member with the most accumulated attention) anchors Gaussian-kernel weights, and the slot holds the weighted
keys and (scaled) values. Unmerged tokens stay as they are; the survivors are front-packed in time order.

No official code exists. Every point the paper leaves open is
an option of `KVMergerPolicy`, with the paper's reading (or, where the paper is silent, the most faithful one)
as the default:

  phase            prefill only (`during_decode=False`): the merge runs in the prefill hand-off, i.e. the
                   `compact(cache, capacity=...)` call that follows the prefill forward (the convention SnapKV
                   and PyramidKV use); a call without `capacity` (a decode step, or every step of token-by-token
                   streaming) returns the cache unchanged. `during_decode=True` (a lacax extension) also merges
                   at those calls whenever a (layer, row, head) is over `budget`.
  protection       the `recent` newest tokens and the `protected_top` tokens with the largest accumulated
                   attention are never merged. The paper's proportions ("0.17% recent / 0.12% attention" at
                   the 50% budget) are read literally as fractions 0.0017 / 0.0012 of the sequence; if the
                   "%" is a typo for fractions 0.17 / 0.12, pass those. A Python `float` is a fraction of the
                   tokens the row has seen (ceil of the float32 product), an `int` a token count.
  merging sets     scan from the last token backwards; token i joins the set of token i + 1 when
                   cos(k_i, k_{i+1}) > `eps` (0.75) and neither is protected: sets are maximal runs of
                   slot-adjacent, valid, unprotected keys linked by similar neighbours. The paper does not
                   say whether a newcomer is compared with its neighbour or with the whole set; lacax reads
                   "neighbour" (adjacent chaining). Runs never cross a protected token or an
                   empty slot.
  granularity      "kv_head" (every re-implementation; default) or "layer" (the paper's wording): the heads
                   of a layer share their sets, built from the head-mean cosine and protected by the head-mean
                   score. Pivots and weights stay per head (each head merges its own keys with its own
                   scores).
  similarity_on    "rope" (default): cosines and Gaussian distances use keys rotated at their original
                   positions, i.e. the key states the attention used (the paper works on HF's post-RoPE
                   cache); "raw": on the stored pre-RoPE keys.
  merge_keys_on    "rope" (default): the paper averages post-RoPE keys. The cache stores pre-RoPE keys, so
                   each member is rotated by (p_i - p_pivot) before averaging; read at the pivot's position
                   (`rope_mode="original"`), the merged slot equals sum_i w_i RoPE(k_i, p_i) exactly.
                   "raw": average the stored pre-RoPE keys (cheaper; differs from the paper's post-RoPE mean).
  pivot / weights  pivot p = the member with the largest accumulated attention (ties: the oldest);
                   g_i = exp(-||k_p - k_i||^2 / (2 sigma^2)), w_i = g_i / sum_j g_j (g_p = 1, so the pivot
                   has the largest weight). merged key = sum_i w_i k_i; merged value = |S| sum_i w_i v_i with
                   `value_scale_by_size=True` (the paper's "to reflect the number of value states"), else
                   sum_i w_i v_i.
  sigma            5.0 (the paper's ablation optimum; its adaptive formula is circular) or "mean_distance":
                   per set, the mean of ||k_p - k_i|| over the non-pivot members (floored at 1e-6).
  position, score  a merged slot keeps the pivot's original position (the pivot is the member the attention
                   looked at most, and its key carries the largest weight) and the sum of its members'
                   scores (the attention the set received, so later top-k protection and pivots at decode
                   time see the set's total mass).
  budget           None (default, the paper: a fixed `eps` with tuned protection sets the compression).
                   With `budget` (int slots, or float fraction of the tokens seen) a (layer, row, head)
                   merges only while it holds more valid tokens than the budget. `exact_budget=True` ignores
                   `eps` and merges the most similar adjacent pairs until exactly
                   min(n_valid, budget) slots remain (see `_exact_budget_links`); the third-party "binary
                   search on eps" is replaced by a search over the similarity *rank*, which cannot miss the
                   target because of tied or jumping similarities.
  skip_layers      (0, 1, -1): the first two and the last layer are never merged. This comes from a
                   second-hand summary and is unverified against the paper; pass () to merge every layer.
  max_run          static bound on a set's size (the kernel unrolls over it). A longer run is split from its
                   newest end into chunks of `max_run` (what the backward scan gives when a set is closed at
                   `max_run` members). The paper has no bound; 16 leaves sets of up to 16 tokens.
  rope_mode        "original" (default): merged slots are read at the pivot's original position and new tokens
                   continue from the original positions, as in an HF cache whose keys were merged after RoPE;
                   "slot" gives the StreamingLLM-style position shift instead.
  score_mode       "accumulate" (default): the H2O-style attention received, summed over all queries so far,
                   which the paper names as the pivot and protection statistic.

Shapes (L = layers, B = batch, S = cache slots, S_out = output slots, KV = kv heads, D = head_dim) follow
`lacax.cache.kv_cache`. The merge itself is `pallas_kernels.merge.segment_merge`: the plan is a (start,
run_len) pair per output slot plus a weight per source slot, all static-shape integer arithmetic (cumsum,
cummax/cummin, sorts, segment sums), so `compact` is jit- and `lax.while_loop`-compatible.

Memory: like the paper (which bounds neither prefill memory nor the tensor size), `decode_capacity()` sizes the decode
cache for the whole run and merging never increases the occupied count, so nothing can overflow. The budget
bounds the *occupied* slots, not the array: a bounded array (budget + 1 slots, as H2O) would be unsafe here,
because the skipped layers keep every token and a threshold (or an unreachable exact budget) can leave more
sets than the budget, which would then have to be cut off. A head with fewer survivors than the layer's
longest head has empty slots before the write cursor, which the attention mask ignores.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import (KVCache, PRE_ROPE_MODES, SCORE_AGGS, quantize_kv,
                                   validate_score_mode)
from lacax.cache import plans
from lacax.cache.base import CachePolicy, lean_decode_cache
from lacax.model import rope as rope_lib
from lacax.model.config import ModelConfig

KEY_SPACES = ("rope", "raw")
GRANULARITIES = ("kv_head", "layer")
SIGMA_RULES = ("mean_distance",)
IMPLS = ("auto", "pallas", "reference")

# Floors for norms and the adaptive sigma: keep zero keys and identical members finite (weight 1 at distance 0).
_TINY = 1e-30
_MIN_SIGMA = 1e-6


@flax.struct.dataclass
class KVMergerState:
  """The policy's state in `KVCache.state`.

  Attributes:
    inv_freq: [head_dim // 2] float32 RoPE inverse frequencies of the model (scaling applied), so that
      `compact`, which sees only the cache, can rotate keys for the "rope" similarity and merge spaces.
  """

  inv_freq: jax.Array


class MergePlan(NamedTuple):
  """What one compaction does, per (layer, row, kv head).

  Attributes:
    start: [L, B, S_out, KV] int32 first source slot of output slot o's run (0 where empty).
    run_len: [L, B, S_out, KV] int32 members of the run, in [0, max_run]; 0 = empty output slot.
    key_weight: [L, B, S, KV] float32 Gaussian weight w_i of each source slot within its run (sums to 1 per
      run, 1 for an unmerged token, 0 for an empty slot).
    value_weight: [L, B, S, KV] float32 weight applied to values: |S| * w_i with `value_scale_by_size`, else w_i.
    pivot: [L, B, S, KV] int32 source slot of the pivot of each source slot's run (undefined for empty slots).
    protected: [L, B, S, KV] bool source slot is a recent or top-attention token (never merged).
    out_pos: [L, B, S_out, KV] int32 original position of each output slot (the pivot's), -1 = empty.
    out_scores: [L, B, S_out, KV] float32 attention statistic of each output slot (sum over the run).
    num_out: [L, B, KV] int32 occupied output slots (front-packed).
  """

  start: jax.Array
  run_len: jax.Array
  key_weight: jax.Array
  value_weight: jax.Array
  pivot: jax.Array
  protected: jax.Array
  out_pos: jax.Array
  out_scores: jax.Array
  num_out: jax.Array


def _check_amount(name: str, value, *, allow_zero: bool) -> int | float:
  """Validates a count (int) or fraction (float) option and returns it as a plain int / float."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"KVMergerPolicy.{name}={value!r} must be an int (token count) or a float (fraction)")
  if isinstance(value, (int, np.integer)):
    value = int(value)
    if value < (0 if allow_zero else 1):
      raise ValueError(f"KVMergerPolicy.{name}={value} must be >= {0 if allow_zero else 1} as a token count")
    return value
  if isinstance(value, (float, np.floating)):
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
      raise ValueError(f"KVMergerPolicy.{name}={value} must be a fraction in {'[0' if allow_zero else '(0'}, 1] "
                       "(pass an int for a token count)")
    return value
  raise ValueError(f"KVMergerPolicy.{name}={value!r} must be an int (token count) or a float (fraction)")


def _resolve_amount(amount: int | float, seen: jax.Array) -> jax.Array:
  """Token count of a count/fraction option: int32, broadcast like `seen` (tokens the row has seen)."""
  if isinstance(amount, float):
    return jnp.ceil(jnp.float32(amount) * seen.astype(jnp.float32)).astype(jnp.int32)
  return jnp.full(seen.shape, amount, jnp.int32)


def _adjacent_cosine(keys: jax.Array) -> jax.Array:
  """[L, B, S, KV] float32: entry s = cos(keys[s], keys[s + 1]); the last slot (no neighbour) is -inf.

  Args:
    keys: [L, B, S, KV, D] float32.
  """
  a, b = keys[:, :, :-1], keys[:, :, 1:]
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1)
  cos = dot * jax.lax.rsqrt(jnp.maximum(norms, _TINY))
  return jnp.pad(cos, ((0, 0), (0, 0), (0, 1), (0, 0)), constant_values=-jnp.inf)


def _protected_mask(valid: jax.Array, scores: jax.Array, recent: jax.Array, top: jax.Array) -> jax.Array:
  """[L, B, S, H] bool: the `recent` newest valid slots and the `top` best-scored other valid slots.

  Args:
    valid: [L, B, S, H] bool.
    scores: [L, B, S, H] float32 accumulated attention.
    recent, top: [1, B] int32 counts per row.
  """
  is_recent = plans.recent_mask(valid, recent)
  candidates = valid & ~is_recent
  is_top = candidates & (plans.descending_rank(scores, candidates) < top[..., None, None])
  return is_recent | is_top


def _split_long_runs(link: jax.Array, valid: jax.Array, max_run: int) -> jax.Array:
  """Breaks runs longer than `max_run` into chunks of `max_run` counted from the run's newest end.

  Args:
    link: [L, B, S, H] bool, link[s] = slots s and s + 1 are in the same run (both valid).
    valid: [L, B, S, H] bool.

  Returns:
    link with the links between chunks removed: exactly the sets of a backward scan that closes a set when
    it has `max_run` members.
  """
  slots = link.shape[2]
  if max_run >= slots:
    return link
  s = jnp.arange(slots, dtype=jnp.int32)[None, None, :, None]
  run_end = jax.lax.cummin(jnp.where(valid & ~link, s, slots), axis=2, reverse=True)
  # s and s + 1 are in different chunks when s + 1 starts one: (end - (s + 1)) % max_run == max_run - 1.
  return link & ((run_end - s) % max_run != 0)


def _exact_budget_links(pair_ok: jax.Array, sim: jax.Array, valid: jax.Array, target: jax.Array,
                        max_run: int) -> jax.Array:
  """Links the most similar eligible adjacent pairs so that exactly `target` runs remain.

  Pairs are added in order of decreasing similarity (ties: older pair first). After splitting at `max_run`,
  each added link lowers the run count by 0 or 1 (joining runs of a and b members turns
  ceil(a/m) + ceil(b/m) chunks into ceil((a+b)/m), which is at most one fewer) and never raises it, so the
  count is a non-increasing function of the number k of added pairs with steps of at most one. A binary
  search for the smallest k with count(k) <= target therefore lands on count == target whenever the target
  is reachable at all. Without `max_run` splits count(k) = n_valid - k; the search handles both cases. When
  even linking every eligible pair leaves more than `target` runs (too many protected tokens, or
  `max_run` * target < the unprotected stretch), every eligible pair is linked: the fewest runs reachable.

  Args:
    pair_ok: [L, B, S, H] bool, slots s and s + 1 may be merged (valid, unprotected, layer active).
    sim: [L, B, S, H] float32 adjacent cosine similarity.
    valid: [L, B, S, H] bool.
    target: [L, B, 1, H] int32 runs wanted.
    max_run: static run-length bound.

  Returns:
    [L, B, S, H] bool links (already split at `max_run`).
  """
  slots = pair_ok.shape[2]
  rank = plans.descending_rank(sim, pair_ok)
  n_valid = jnp.sum(valid, axis=2, keepdims=True, dtype=jnp.int32)

  def links_for(k):
    return _split_long_runs(pair_ok & (rank < k), valid, max_run)

  def body(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    runs = n_valid - jnp.sum(links_for(mid), axis=2, keepdims=True, dtype=jnp.int32)
    ok = runs <= target
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo = jnp.zeros_like(n_valid)
  hi = jnp.sum(pair_ok, axis=2, keepdims=True, dtype=jnp.int32)
  _, hi = jax.lax.fori_loop(0, slots.bit_length() + 1, body, (lo, hi))
  return links_for(hi)


def _rotate_by(x: jax.Array, delta: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """x [..., D] rotated by the signed position offsets delta [...] (float32 result)."""
  angles = delta.astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return rope_lib.rotate(x.astype(jnp.float32), jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1))


@dataclasses.dataclass(frozen=True)
class KVMergerPolicy(CachePolicy):
  """KVMerger as a cache policy; the module docstring explains every option and its default.

  Attributes:
    eps: cosine threshold for adjacent keys to join a set (0.75; > 1 disables merging). Ignored with
      `exact_budget`.
    recent: newest tokens never merged: int count or float fraction of the tokens seen (0.0017).
    protected_top: tokens with the largest accumulated attention (among the non-recent ones) never merged:
      int count or float fraction (0.0012).
    budget: None (threshold merging, the paper), or int slots / float fraction of the tokens seen: a
      (layer, row, kv head) merges only while it holds more valid tokens than this.
    exact_budget: merge until exactly min(n_valid, budget) slots remain (needs `budget`; ignores `eps`).
    during_decode: also merge at decode steps when over `budget` (needs `budget`). Merged slots then count as
      single members when merged again (a lacax extension; the paper merges the prefill cache once).
    granularity: "kv_head" (sets per kv head) or "layer" (sets shared by the heads of a layer).
    similarity_on: "rope" or "raw" key space for cosines and Gaussian distances.
    merge_keys_on: "rope" (average the post-RoPE keys, stored relative to the pivot) or "raw".
    value_scale_by_size: merged value = |S| * sum_i w_i v_i (True, the paper) or sum_i w_i v_i.
    sigma: Gaussian kernel width: a positive float (5.0) or "mean_distance".
    skip_layers: layer indices (negative counts from the end) never merged; (0, 1, -1) is unverified.
    max_run: static maximum set size; longer runs are split from their newest end.
    rope_mode: "original" (merged slots at the pivot's position) or "slot" (position shift).
    score_mode: the attention statistic recorded by the forward ("accumulate", H2O-style).
    score_agg: reduction of a GQA group's query heads to their kv head ("mean", "max", "sum").
    impl: `segment_merge` implementation: "auto" (Pallas on TPU/GPU), "pallas" or "reference".
    lean_decode: without `during_decode` nothing reads the scores after the hand-off, so the decode cache
      records none and (rope_mode "original") stores its keys rotated at their (pivot) positions
      (`lacax.cache.base.lean_decode_cache`): the CPU decode kernel then serves decode. False keeps the
      recording cache (the behaviour before; for benchmarks).
  """

  eps: float = 0.75
  recent: int | float = 0.0017
  protected_top: int | float = 0.0012
  budget: int | float | None = None
  exact_budget: bool = False
  during_decode: bool = False
  granularity: str = "kv_head"
  similarity_on: str = "rope"
  merge_keys_on: str = "rope"
  value_scale_by_size: bool = True
  sigma: float | str = 5.0
  skip_layers: tuple[int, ...] = (0, 1, -1)
  max_run: int = 16
  rope_mode: str = "original"
  score_mode: str = "accumulate"
  score_agg: str = "mean"
  impl: str = "auto"
  lean_decode: bool = True

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float, np.number)) or math.isnan(self.eps):
      raise ValueError(f"KVMergerPolicy.eps={self.eps!r} must be a real number (cosine threshold; > 1 disables)")
    set_("eps", float(self.eps))
    set_("recent", _check_amount("recent", self.recent, allow_zero=True))
    set_("protected_top", _check_amount("protected_top", self.protected_top, allow_zero=True))
    if self.budget is not None:
      set_("budget", _check_amount("budget", self.budget, allow_zero=False))
    if self.exact_budget and self.budget is None:
      raise ValueError("KVMergerPolicy.exact_budget=True needs a budget (int slots or float fraction)")
    if self.during_decode and self.budget is None:
      raise ValueError("KVMergerPolicy.during_decode=True needs a budget: decode steps merge only when over it")
    for name, allowed in (("granularity", GRANULARITIES), ("similarity_on", KEY_SPACES),
                          ("merge_keys_on", KEY_SPACES), ("rope_mode", PRE_ROPE_MODES), ("score_agg", SCORE_AGGS),
                          ("impl", IMPLS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"KVMergerPolicy.{name}={getattr(self, name)!r} must be one of {list(allowed)}")
    if self.score_mode is None:
      raise ValueError("KVMergerPolicy.score_mode=None is not allowed: pivots and top-attention protection need "
                       "attention statistics ('accumulate' is the paper's)")
    validate_score_mode(self.score_mode)
    if isinstance(self.sigma, str):
      if self.sigma not in SIGMA_RULES:
        raise ValueError(f"KVMergerPolicy.sigma={self.sigma!r} must be a positive float or one of "
                         f"{list(SIGMA_RULES)}")
    elif isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float, np.number)) or not self.sigma > 0:
      raise ValueError(f"KVMergerPolicy.sigma={self.sigma!r} must be a positive float or 'mean_distance'")
    else:
      set_("sigma", float(self.sigma))
    if isinstance(self.max_run, bool) or not isinstance(self.max_run, (int, np.integer)) or self.max_run < 1:
      raise ValueError(f"KVMergerPolicy.max_run={self.max_run!r} must be an int >= 1")
    set_("max_run", int(self.max_run))
    try:
      skip = tuple(int(i) for i in self.skip_layers)
    except (TypeError, ValueError) as e:
      raise ValueError(f"KVMergerPolicy.skip_layers={self.skip_layers!r} must be a sequence of ints") from e
    set_("skip_layers", skip)

  # ------------------------------------------------------------------------------------------------------
  # CachePolicy interface.
  # ------------------------------------------------------------------------------------------------------

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    """The whole run (see the module docstring): merging never increases the occupied count."""
    del cfg
    return max_tokens

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    """Without `during_decode`: the most a layer holds after merging the prompt (`max_held`) plus the generated
    tokens; with it, the whole run."""
    total = prompt_tokens + new_tokens
    if self.during_decode:
      return total
    return min(total, int(np.max(self.max_held(cfg, prompt_tokens))) + new_tokens)

  @property
  def compacts_in_decode(self) -> bool:
    return self.during_decode

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    """`seen` in skipped layers; in merging layers with `exact_budget`, the budget unless the protected tokens
    and the `max_run` split leave more sets: at most recent + top singletons, plus the unprotected stretches
    between them (at most top + 1) cut into runs of `max_run`."""
    held = np.full(cfg.num_layers, seen)
    if not self.exact_budget:
      return held
    amount = lambda a: math.ceil(np.float32(a) * np.float32(seen)) if isinstance(a, float) else a  # noqa: E731
    budget, recent, top = amount(self.budget), amount(self.recent), amount(self.protected_top)
    protected = min(seen, recent + top)
    floor = protected + min(top + 1, seen - protected) + math.ceil((seen - protected) / self.max_run)
    held[self._layer_mask(cfg.num_layers)] = min(seen, max(budget, floor))
    return held

  def init_state(self, cfg: ModelConfig) -> KVMergerState:
    return KVMergerState(inv_freq=jnp.asarray(rope_lib.inv_frequencies(cfg), jnp.float32))

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """Merges in the prefill hand-off (and, with `during_decode`, at decode steps over budget).

    Only the (layer, row, kv head) triples that are active (not in `skip_layers`, and over `budget` if one
    is set) change, apart from front-packing; a decode-step call with nothing active skips the computation
    through `lax.cond`.

    Args:
      cache: a cache built by `self.init` (its state holds the RoPE frequencies).
      capacity: output slots; given exactly in the prefill hand-off (`lacax.generate.prefill`). It must hold
        the merged count (`slots` sizes it for the whole run).

    Returns:
      The merged cache; unchanged for a decode-step call (`capacity=None`) without `during_decode`.
    """
    if capacity is None and not self.during_decode:
      return cache
    self._state(cache)
    merge = lambda c: self._apply(c, self.plan(c, capacity))  # noqa: E731
    if capacity is not None and capacity != cache.capacity:
      out = merge(cache)  # the shapes change, so there is nothing to skip
    else:
      out = jax.lax.cond(jnp.any(self._active(cache)), merge, lambda c: c, cache)
    if capacity is not None and self.lean_decode and not self.during_decode:
      out = lean_decode_cache(out)
    return out

  # ------------------------------------------------------------------------------------------------------
  # Planning and applying.
  # ------------------------------------------------------------------------------------------------------

  def _state(self, cache: KVCache) -> KVMergerState:
    if not isinstance(cache.state, KVMergerState):
      raise ValueError(f"KVMergerPolicy.compact needs a cache built by KVMergerPolicy.init (state is "
                       f"{type(cache.state).__name__}, expected KVMergerState)")
    if cache.scores is None:
      raise ValueError("KVMergerPolicy.compact needs attention scores: build the cache with KVMergerPolicy.init")
    return cache.state

  def _layer_mask(self, num_layers: int) -> np.ndarray:
    """[L] bool, the layer may merge (static)."""
    on = np.ones(num_layers, bool)
    for i in self.skip_layers:
      if not -num_layers <= i < num_layers:
        raise ValueError(f"KVMergerPolicy.skip_layers={self.skip_layers} holds {i}, out of range for a model "
                         f"with {num_layers} layers")
      on[i] = False
    return on

  def _tokens_seen(self, cache: KVCache) -> jax.Array:
    """[1, B] int32 tokens the row has seen (largest original position + 1): the fractions' base."""
    return (jnp.max(cache.pos, axis=(0, 2, 3)) + 1)[None, :]

  def _grouped(self, cache: KVCache):
    """(valid, scores) as [L, B, S, H]: H = KV per head, or 1 shared by the layer (all heads valid, mean)."""
    valid = cache.pos >= 0
    if self.granularity == "layer":
      return jnp.all(valid, axis=-1, keepdims=True), jnp.mean(cache.scores, axis=-1, keepdims=True)
    return valid, cache.scores

  def _budget(self, cache: KVCache) -> jax.Array:
    """[1, B, 1, 1] int32 budget in slots per row."""
    return _resolve_amount(self.budget, self._tokens_seen(cache))[..., None, None]

  def _active(self, cache: KVCache) -> jax.Array:
    """[L, B, 1, H] bool: the (layer, row, head group) merges (not skipped; over budget if one is set)."""
    valid, _ = self._grouped(cache)
    active = jnp.asarray(self._layer_mask(cache.num_layers))[:, None, None, None]
    if self.budget is not None:
      active = active & (jnp.sum(valid, axis=2, keepdims=True, dtype=jnp.int32) > self._budget(cache))
    return active

  def _similarity_keys(self, cache: KVCache, inv_freq: jax.Array) -> jax.Array:
    """[L, B, S, KV, D] float32 keys in the similarity space."""
    keys = cache.float_keys()
    if self.similarity_on == "rope":
      keys = rope_lib.apply_rope(keys, cache.pos, inv_freq)
    return keys

  def _links(self, cache: KVCache, sim_keys: jax.Array):
    """(links [L, B, S, KV] bool, protected [L, B, S, KV] bool): link[s] = s and s + 1 share a set."""
    num_layers, batch, slots, kv_heads, _ = cache.k.shape
    valid, scores = self._grouped(cache)
    sim = _adjacent_cosine(sim_keys)
    if self.granularity == "layer":
      sim = jnp.mean(sim, axis=-1, keepdims=True)
    seen = self._tokens_seen(cache)
    protected = _protected_mask(valid, scores, _resolve_amount(self.recent, seen),
                                _resolve_amount(self.protected_top, seen))
    mergeable = valid & ~protected
    pair_ok = mergeable & jnp.pad(mergeable[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)))
    pair_ok = pair_ok & self._active(cache)
    if self.exact_budget:
      n_valid = jnp.sum(valid, axis=2, keepdims=True, dtype=jnp.int32)
      target = jnp.minimum(n_valid, self._budget(cache))
      links = _exact_budget_links(pair_ok, sim, valid, target, self.max_run)
    else:
      links = _split_long_runs(pair_ok & (sim > self.eps), valid, self.max_run)
    shape = (num_layers, batch, slots, kv_heads)
    return jnp.broadcast_to(links, shape), jnp.broadcast_to(protected, shape)

  def plan(self, cache: KVCache, capacity: int | None = None) -> MergePlan:
    """The merge plan of one merging compaction (what `compact` applies in the prefill hand-off).

    Args:
      cache: a cache built by `self.init`.
      capacity: output slots S_out (default: the cache's capacity).

    Returns:
      The `MergePlan`; inactive (layer, row, head) triples get single-token runs of weight 1.
    """
    state = self._state(cache)
    num_layers, batch, slots, kv_heads, _ = cache.k.shape
    out_slots = capacity or slots
    sim_keys = self._similarity_keys(cache, state.inv_freq)
    links, protected = self._links(cache, sim_keys)
    valid = cache.pos >= 0

    # Runs: a valid slot starts one unless linked to its predecessor; output slot = rank of the run.
    s = jnp.arange(slots, dtype=jnp.int32)[None, None, :, None]
    linked_prev = jnp.pad(links[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))
    is_start = valid & ~linked_prev
    run_start = jax.lax.cummax(jnp.where(is_start, s, -1), axis=2)
    run_end = jax.lax.cummin(jnp.where(valid & ~links, s, slots), axis=2, reverse=True)
    run_len = jnp.where(valid, run_end - run_start + 1, 0)
    out_index = jnp.cumsum(is_start, axis=2, dtype=jnp.int32) - 1
    num_out = jnp.sum(is_start, axis=2, dtype=jnp.int32)

    # Segment ids: one per (layer, row, head, run); empty slots go to a dummy segment.
    rows = (jnp.arange(num_layers)[:, None, None] * batch + jnp.arange(batch)[None, :, None]) * kv_heads
    rows = (rows + jnp.arange(kv_heads)[None, None, :])[:, :, None, :]
    num_segments = num_layers * batch * kv_heads * slots
    seg = jnp.where(valid, rows * slots + out_index, num_segments)

    def per_run(values, op):
      reduced = op(values.reshape(-1), seg.reshape(-1), num_segments=num_segments + 1)
      return reduced[seg]

    scores = jnp.where(valid, cache.scores, -jnp.inf)
    best = per_run(scores, jax.ops.segment_max)
    pivot = per_run(jnp.where(valid & (scores == best), s, slots), jax.ops.segment_min)
    pivot = jnp.clip(pivot, 0, slots - 1)
    pivot_keys = jnp.take_along_axis(sim_keys, pivot[..., None], axis=2)
    dist2 = jnp.sum(jnp.square(sim_keys - pivot_keys), axis=-1)
    if self.sigma == "mean_distance":
      mean_dist = per_run(jnp.where(valid, jnp.sqrt(dist2), 0.0), jax.ops.segment_sum) / jnp.maximum(run_len - 1, 1)
      sigma = jnp.maximum(mean_dist, _MIN_SIGMA)
    else:
      sigma = jnp.float32(self.sigma)
    gauss = jnp.where(valid, jnp.exp(-dist2 / (2.0 * jnp.square(sigma))), 0.0)
    key_weight = jnp.where(valid, gauss / per_run(gauss, jax.ops.segment_sum), 0.0)
    value_weight = key_weight * run_len.astype(jnp.float32) if self.value_scale_by_size else key_weight
    score_sum = per_run(jnp.where(valid, cache.scores, 0.0), jax.ops.segment_sum)
    pivot_pos = jnp.take_along_axis(cache.pos, pivot, axis=2)

    # Scatter the run of each start slot to its output slot (runs past `out_slots` are dropped).
    target = jnp.where(is_start, out_index, out_slots)
    li, bi, _, hi = jnp.ix_(*(np.arange(n) for n in (num_layers, batch, 1, kv_heads)))

    def to_outputs(values, fill):
      out = jnp.full((num_layers, batch, out_slots, kv_heads), fill, values.dtype)
      return out.at[li, bi, target, hi].set(values, mode="drop")

    return MergePlan(
        start=to_outputs(run_start, 0), run_len=to_outputs(run_len, 0), key_weight=key_weight,
        value_weight=value_weight, pivot=pivot, protected=protected,
        out_pos=to_outputs(pivot_pos, -1), out_scores=to_outputs(score_sum, 0.0), num_out=num_out)

  def _apply(self, cache: KVCache, plan: MergePlan) -> KVCache:
    """Runs `segment_merge` on keys and values and installs the plan's positions, scores and lengths."""
    from pallas_kernels import merge  # pylint: disable=g-import-not-at-top

    # An int8 cache merges dequantized keys / values and stores the merged ones quantized again.
    keys = cache.float_keys()
    values = cache.float_values()
    if self.merge_keys_on == "rope":
      # Member i rotated by p_i - p_pivot: read at the pivot's position it is RoPE(k_i, p_i).
      pivot_pos = jnp.take_along_axis(cache.pos, plan.pivot, axis=2)
      keys = _rotate_by(keys, jnp.where(cache.pos >= 0, cache.pos - pivot_pos, 0), cache.state.inv_freq)
    merge_fn = lambda x, w: merge.segment_merge(x, plan.start, plan.run_len, w,  # noqa: E731
                                                max_run=self.max_run, impl=self.impl)
    k = merge_fn(keys, plan.key_weight)
    v = merge_fn(values, plan.value_weight)
    out_slots = plan.start.shape[2]
    length = jnp.minimum(jnp.max(plan.num_out, axis=-1), out_slots).astype(jnp.int32)
    scales = {}
    if cache.quantized:
      (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
      scales = {"k_scale": k_scale, "v_scale": v_scale}
    return cache.replace(k=k.astype(cache.k.dtype), v=v.astype(cache.v.dtype), pos=plan.out_pos,
                         scores=plan.out_scores, length=length, **scales)
