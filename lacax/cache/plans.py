"""The plan helpers every cache policy shares: one home for building and applying keep plans.

A compaction is a *plan* (for every output slot of every (layer, row, kv head), the source slot it takes, -1 =
empty) applied with one gather over the stacked cache (`lacax.cache.kv_cache.gather_slots`, which picks the
Pallas kernel on TPU/GPU). The helpers here build plans from slot arithmetic and attention scores:

  apply_plan         gathers a plan when needed (`lax.cond` skips steps that keep everything);
  topk_keep_plan     protected tokens + the top-k others by score, kept in slot order (ties: the older token);
  keep_mask_plan     the plan of a keep mask (kept slots front-packed in slot order);
  within_chunks      the slot axis cut into fixed-size chunks; chunked_keep  each chunk's share of a budget;
  descending_rank    the rank of every eligible slot by a score, largest first (ties: the older token);
  recent_mask        the `count` newest occupied slots;
  head_adaptive_keep AdaKV's allocation of a layer's budget across its kv heads (AdaKV, CriticalAdaKV);
  value_weighted     CriticalKV's stage-two score (s + epsilon) * ||W_o v||_1 (CriticalKV, CriticalAdaKV);
  pool_scores        SnapKV's 1-D pooling of scores over the slot axis;
  occupancy          tokens held per (layer, row, kv head);
  scoring_keys       the cached keys before or after RoPE, whatever the cache stores (key-based scorers);
  head_major / slot_major   [L, B, S, KV, ...] <-> [L, B, KV, S, ...] for per-head score functions;
  model_queries      every layer's queries of calibration text (policies calibrated offline: Q-Filters,
                     ExpectedAttention's statistics);

and the validation helpers the policies' `__post_init__` use, so that every message names the policy, the
field, the value and the constraint.

Shapes: L = layers, B = batch, S = slots, KV = kv heads (a plan shared by the heads may use KV = 1).

Conventions of the score-based policies built on these helpers (H2O, TOVA, SnapKV, PyramidKV, KVMerger), and
where they differ from the references, which all run at batch 1 on MHA caches:

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

Cache sizing. `decode_capacity(cfg, max_tokens)` is the static capacity of the decode-phase cache of a run that feeds
`max_tokens` tokens in all (prompt + generated, as `lacax.generate` calls it). H2O and TOVA never hold more
than budget + 1 tokens (the budget plus the token of the current step). SnapKV and PyramidKV only compress the
prompt and let the decode cache grow, so their decode cache must also hold every generated token:
`run_capacity(cfg, prompt_tokens, new_tokens)` (what `lacax.generate` calls) sizes it as (kept prompt tokens) +
new_tokens; `decode_capacity(cfg, max_tokens)`, which does not know the split, does so only when the policy's
`max_new_tokens` is set, and otherwise sizes it for the whole run.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import ROPE_MODES, SCORE_AGGS, KVCache, gather_slots
from lacax.model import rope as rope_lib

POOLINGS = ("avg", "max")


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


def descending_rank(values: jax.Array, eligible: jax.Array) -> jax.Array:
  """[..., S, H] int32 rank of each eligible slot by `values` along axis 2, largest first (ties: lower slot).

  Ineligible slots rank after every eligible one. Two stable sorts along axis 2.
  """
  key = jnp.where(eligible, -values, jnp.inf)
  order = jnp.argsort(key, axis=2, stable=True)
  return jnp.argsort(order, axis=2, stable=True).astype(jnp.int32)


def per_plane(count, ndim: int = 4):
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
  return valid & (at_or_after <= per_plane(count))


def head_adaptive_keep(scores: jax.Array, protected: jax.Array, valid: jax.Array, budget: int,
                       n_safe: int) -> tuple[jax.Array, jax.Array]:
  """AdaKV's allocation (kvpress `presses/adakv_press.py::AdaKVPress.compress`): every kv head keeps its
  protected tokens and its `n_safe` best, then the layer's remaining budget (KV * budget in all) goes to the
  best-scored of all its heads' other tokens together (one ranking over the (slot, head) pairs, slot-major:
  ties go to the older token, then to the lower head).

  Args:
    scores, protected, valid: [L, B, S, KV] (an inner policy's `keep_scores` and the cache's occupied slots).
    budget: mean tokens kept per kv head; n_safe: the per-head safeguard.

  Returns:
    (forced, keep): [L, B, S, KV] bool: the safeguarded and protected tokens, and every kept token.
  """
  L, B, S, KV = valid.shape
  own_rank = descending_rank(jnp.where(protected, jnp.inf, scores.astype(jnp.float32)), valid)
  forced = valid & (protected | (own_rank < n_safe))
  flat = jnp.where(forced, jnp.inf, scores.astype(jnp.float32)).reshape(L, B, S * KV, 1)
  layer_rank = descending_rank(flat, valid.reshape(L, B, S * KV, 1)).reshape(L, B, S, KV)
  return forced, forced | (valid & (layer_rank < KV * budget))


def value_weighted(scores: jax.Array, cache: KVCache, epsilon: float, owner: str) -> jax.Array:
  """CriticalKV's stage-two score (kvpress `presses/criticalkv_press.py`): (s + epsilon) * ||W_o v||_1, with the
  value norms the forward recorded (`StatsRecording(value_norm=True)`)."""
  if cache.stats is None or cache.stats.value_norm is None:
    raise ValueError(f"{owner} needs a cache recording value norms (StatsRecording(value_norm=True)); build "
                     "the cache with the policy's init()")
  return (scores.astype(jnp.float32) + epsilon) * cache.stats.value_norm


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
  protected = valid & protected if protected is not None else jnp.zeros_like(valid)
  candidate = valid & ~protected
  rank = descending_rank(scores.astype(jnp.float32), candidate)
  keep = protected | (candidate & (rank < per_plane(keep_count)))
  return keep_mask_plan(keep, out_capacity)


def keep_mask_plan(keep: jax.Array, out_capacity: int) -> jax.Array:
  """Keep plan of a mask: the kept slots of every (layer, row, kv head), in slot order, front-packed.

  Args:
    keep: [L, B, S, KV] bool (KV may be 1 for a plan shared by the heads).
    out_capacity: static number of output slots; must be >= the most kept slots of any plane.

  Returns:
    [L, B, out_capacity, KV] int32 source slots, -1 = empty.
  """
  num_slots = keep.shape[2]
  slot = jnp.arange(num_slots, dtype=jnp.int32)[None, None, :, None]
  packed = jnp.sort(jnp.where(keep, slot, num_slots), axis=2)  # kept slots ascending, then num_slots
  if out_capacity <= num_slots:
    packed = packed[:, :, :out_capacity]
  else:
    pad = [(0, 0), (0, 0), (0, out_capacity - num_slots), (0, 0)]
    packed = jnp.pad(packed, pad, constant_values=num_slots)
  return jnp.where(packed < num_slots, packed, -1).astype(jnp.int32)


def within_chunks(x: jax.Array, chunk_length: int, fill) -> jax.Array:
  """[L, B, S, H] -> [L, B, n, chunk_length, H]: the slot axis cut into n whole chunks, padded by `fill`."""
  L, B, S, H = x.shape
  n = -(-S // chunk_length)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, n * chunk_length - S), (0, 0)), constant_values=fill)
  return x.reshape(L, B, n, chunk_length, H)


def chunk_counts(prompt_len: int, budget: int, chunk_length: int) -> np.ndarray:
  """Tokens each chunk of a `prompt_len`-token prompt keeps under `chunked_keep` (NumPy; the statement it
  computes)."""
  lengths = np.minimum(chunk_length, prompt_len - np.arange(0, prompt_len, chunk_length))
  if prompt_len <= budget:
    return lengths
  return np.minimum(lengths, np.maximum(1, lengths * budget // prompt_len))


def chunked_keep(ranked: jax.Array, valid: jax.Array, budget: int, chunk_length: int) -> jax.Array:
  """Chunked selection (kvpress's ChunkPress and FinchPress's `chunk_length`): the slot axis cut into chunks of
  `chunk_length`; on a P-token prompt chunk c keeps its max(1, (len_c * budget) // P) best (kvpress:
  max(1, int(len_c * (1 - r))) with 1 - r = budget / P, in integer arithmetic; nothing is dropped when
  P <= budget).

  Args:
    ranked: [L, B, S, KV] float32, higher = keep (protected tokens at +inf).
    valid: [L, B, S, KV] bool; every kv head of a (layer, row) holds the whole prompt.
    budget, chunk_length: static ints.

  Returns:
    [L, B, S, KV] bool, the kept slots.
  """
  L, B, S, KV = valid.shape
  n, cl = -(-S // chunk_length), chunk_length
  prompt = jnp.max(jnp.sum(valid, axis=2, dtype=jnp.int32), axis=-1)[:, :, None]  # [L, B, 1]
  start = jnp.arange(n, dtype=jnp.int32)[None, None, :] * cl
  length = jnp.clip(prompt - start, 0, cl)  # [L, B, n] tokens per chunk
  count = jnp.where(prompt <= budget, length,
                    jnp.minimum(length, jnp.maximum(1, length * budget // jnp.maximum(prompt, 1))))
  chunks = within_chunks(ranked, cl, -jnp.inf)
  ok = within_chunks(valid, cl, False)
  rank = descending_rank(chunks.reshape(L, B * n, cl, KV), ok.reshape(L, B * n, cl, KV))
  keep = ok & (rank.reshape(L, B, n, cl, KV) < count[:, :, :, None, None])
  return keep.reshape(L, B, n * cl, KV)[:, :, :S]


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


def occupancy(cache: KVCache) -> jax.Array:
  """[L, B, KV] int32 number of tokens each (layer, row, kv head) holds."""
  return jnp.sum(cache.valid(), axis=2, dtype=jnp.int32)


def check_int(owner: str, name: str, value, minimum: int) -> None:
  """`owner name=value` is an integer >= minimum."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
    raise ValueError(f"{owner} {name}={value!r} must be an integer")
  if value < minimum:
    raise ValueError(f"{owner} {name}={value} must be >= {minimum}")


def check_number(owner: str, name: str, value, low, high=None, *, high_open: bool = False) -> None:
  """`owner name=value` is a real number >= low, and <= high (< high if `high_open`) when high is given."""
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if high is None:
    ok, want = ok and value >= low, f">= {low}"
  else:
    ok = ok and low <= value and (value < high if high_open else value <= high)
    want = f"in [{low}, {high}{')' if high_open else ']'}"
  if not ok:
    raise ValueError(f"{owner} {name}={value!r} must be a number {want}")


def check_rope_and_agg(owner: str, policy) -> None:
  """The policy's `score_agg` and `rope_mode` are supported values (the message names the owner)."""
  if policy.score_agg not in SCORE_AGGS:
    raise ValueError(f"{owner} score_agg={policy.score_agg!r} must be one of {list(SCORE_AGGS)}")
  if policy.rope_mode not in ROPE_MODES:
    raise ValueError(f"{owner} rope_mode={policy.rope_mode!r} must be one of {list(ROPE_MODES)}")


def require_scores(owner: str, cache: KVCache, score_mode: str) -> None:
  """The cache records the statistic `score_mode` (it was built by the policy's `init`)."""
  if cache.scores is None or cache.score_mode != score_mode:
    raise ValueError(f"{owner} needs a cache recording score_mode={score_mode!r}, got "
                     f"score_mode={cache.score_mode!r}; build the cache with the policy's init()")


KEY_SPACES = ("pre_rope", "post_rope")


def scoring_keys(cache: KVCache, space: str, inv_freq: jax.Array) -> jax.Array:
  """[L, B, S, KV, D] float32 cached keys before RoPE ("pre_rope") or rotated at their original positions
  ("post_rope", the keys a Hugging Face / kvpress cache holds), whatever `cache.rope_mode` stores.

  Pre-RoPE caches ("slot", "original") are rotated at `cache.pos` for "post_rope"; a "stored" cache is
  rotated back by -pos for "pre_rope". Empty slots are rotated at 0 (their value does not matter).
  """
  if space not in KEY_SPACES:
    raise ValueError(f"key space {space!r} must be one of {list(KEY_SPACES)}")
  keys = cache.float_keys()
  stored = cache.rope_mode == "stored"
  if (space == "post_rope") == stored:
    return keys
  pos = jnp.maximum(cache.pos, 0).astype(jnp.float32)
  angles = (pos if space == "post_rope" else -pos)[..., None] * inv_freq  # rope_table clips negatives to 0
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return rope_lib.rotate(keys, jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1))


def head_major(x: jax.Array) -> jax.Array:
  """[L, B, S, KV, ...] -> [L, B, KV, S, ...] (the per-head layout of kvpress's `score`, batch-led)."""
  return jnp.swapaxes(x, 2, 3)


def slot_major(x: jax.Array) -> jax.Array:
  """[L, B, KV, S, ...] -> [L, B, S, KV, ...] (the cache's layout), the inverse of `head_major`."""
  return jnp.swapaxes(x, 2, 3)


def model_queries(params, cfg, tokens: jax.Array, lengths: jax.Array, *, rotated: bool) -> jax.Array:
  """[L, B, T, H, hd] float32 queries of every layer for right-padded `tokens` [B, T] (padding rows zeroed),
  rotated at their positions (`rotated`) or before RoPE.

  The residual stream entering each layer comes from the one forward (`ForwardOptions(hidden_layers=...)`,
  no cache); each layer's queries are then its attention norm and `wq` projection (+ `bq`), as in the forward.
  """
  from lacax.model import llama  # pylint: disable=g-import-not-at-top  (llama imports the cache package)

  if isinstance(params["layers"], (list, tuple)):
    raise ValueError("calibration needs a homogeneous model (params['layers'] is a list of segments)")
  t = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  positions = jnp.where(t < lengths[:, None], t, -1)
  options = llama.ForwardOptions(hidden_layers=tuple(range(cfg.num_layers)), logits=False)
  hidden = llama.run(params, tokens, positions, None, cfg, options=options).hidden  # [L, B, T, D]
  inv_freq = rope_lib.inv_frequencies(cfg)
  layers = params["layers"]
  bias = layers.get("bq") if cfg.attention_bias else None

  def layer_queries(h, norm, wq, bq):
    q = llama.project(llama.rms_norm(h, norm, cfg.rms_norm_eps), wq, "btd,dhk->bthk").astype(jnp.float32)
    if bq is not None:
      q = q + bq
    return rope_lib.apply_rope(q, positions[:, :, None], inv_freq) if rotated else q

  q = jax.vmap(layer_queries, in_axes=(0, 0, 0, None if bias is None else 0))(hidden, layers["attn_norm"],
                                                                             layers["wq"], bias)
  return jnp.where((positions >= 0)[None, :, :, None, None], q, 0.0)


def calibration_queries(params, cfg, prompts, *, rotated: bool, skip: int = 0, bucket: int = 64) -> np.ndarray:
  """[L, N, H, hd] float32 queries of the token lists `prompts` (each without its first `skip` tokens),
  concatenated over the prompts: the input of offline calibrations.

  Raises:
    ValueError: no prompt has more than `skip` tokens.
  """
  prompts = [list(p) for p in prompts if len(p) > skip]
  if not prompts:
    raise ValueError(f"calibration needs at least one token list longer than {skip} tokens; got none")
  width = -(-max(len(p) for p in prompts) // bucket) * bucket
  tokens = np.zeros((len(prompts), width), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  run = jax.jit(model_queries, static_argnames=("cfg", "rotated"))
  q = np.asarray(run(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), rotated=rotated))
  return np.concatenate([q[:, row, skip:n] for row, n in enumerate(lengths)], axis=1)
