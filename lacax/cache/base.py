"""The cache-policy interface every method module implements.

A policy is a frozen, hashable dataclass (a static jit argument) with pure functions over `KVCache`:

  decode_capacity(cfg, max_tokens) -> int
                             the static number of slots of the decode-phase cache of a run that feeds
                             `max_tokens` tokens in all (the full cache needs them all; a compacting policy
                             needs its budget plus one decode token);
  run_capacity(cfg, prompt_tokens, new_tokens) -> int
                             the same for a run whose split is known (the longest prompt, then `new_tokens`
                             generated): a prompt compressor (SnapKV, PyramidKV, KVMerger) needs its kept prompt
                             plus the generated tokens, not the whole run. Defaults to `decode_capacity` of the
                             sum; `lacax.generate` and the evaluation jobs call this one;
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

One hook has the model at hand: `after_prefill(params, cfg, cache, tokens, lengths) -> KVCache`, called by every
prefill path between the prompt forward and the hand-off, for a policy whose scores need extra forward passes
(KVzip's context reconstruction); the default returns the cache, wrappers pass it to their inner policy.

Content-agnostic policies (full, streaming, ladder) set `score_mode=None`, so the forward never materialises
attention statistics for them; score-based ones (H2O, TOVA, SnapKV, PyramidKV, KVMerger) name the statistic
they consume and the cache records it. Statistics that are not attention probabilities (||W_o v|| for
CriticalKV, the window's squared queries for ThinK, running query moments for ExpectedAttention's online
statistics) are declared the same way, as `stats_recording` (a `lacax.cache.kv_cache.StatsRecording`).

Scorers and wrappers. A score-based policy also exposes `keep_scores(cache) -> (scores, protected)` (its
ranking of the held tokens and the tokens it always keeps; kvpress's `ScorerPress.score`). The wrappers
(`WrapperPolicy` / `SelectingWrapper` / `HeadAdaptiveWrapper` here; one module each: adakv, criticaladakv,
perlayer, composed, chunk, chunkkv, block, decoding, prefill_decoding, key_rerotation) take any scorer as
`inner` and select with their own budgets, so a new scorer module gets every wrapper for free.
`compacts_in_prefill` (True but for DecodingPolicy) tells the contract test whether a hand-off over the budget
evicts.

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
from lacax.cache.kv_cache import KVCache, StatsRecording, gather_slots, init_cache, strip_recordings
from lacax.model import rope as rope_lib
from lacax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """Base class: subclasses implement `decode_capacity`, `compact` and `max_held`.

  `rope_mode`, `score_mode`, `score_agg` and `stats_recording` are plain class attributes here (not dataclass
  fields), so a subclass may declare any of them as its own field, property or constant without shifting its
  positional fields.
  """

  rope_mode = "slot"
  score_mode = None
  score_agg = "mean"
  stats_recording = None  # a `StatsRecording`: the per-layer statistics besides attention the policy reads

  @property
  def name(self) -> str:
    return type(self).__name__.removesuffix("Policy").lower()

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    """Static slot count of the decode-phase cache of a run that feeds `max_tokens` tokens in all."""
    raise NotImplementedError

  def run_problems(self, cfg: ModelConfig) -> list[str]:
    """What the policy needs to run on a model of `cfg` and lacks (a calibration file that is unset, unreadable
    or of another model's shape), as messages, so that a job reports them before any work rather than at the
    first compaction. The default asks the policies it is built from (its dataclass fields that are policies:
    a wrapper's `inner`, a composition's parts); a policy that reads a file adds its own."""
    problems = []
    for field in dataclasses.fields(self) if dataclasses.is_dataclass(self) else ():
      part = getattr(self, field.name)
      if isinstance(part, CachePolicy):
        problems.extend(part.run_problems(cfg))
    return problems

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    """Static slot count of the decode cache of a run that prefills up to `prompt_tokens` tokens per row and
    then generates `new_tokens` (the prompt's last token is not fed again; the generated ones are)."""
    return self.decode_capacity(cfg, prompt_tokens + new_tokens)

  def init_state(self, cfg: ModelConfig):
    del cfg
    return None

  def init(self, cfg: ModelConfig, batch_size: int, capacity: int, *, dtype=None) -> KVCache:
    """An empty cache of `capacity` slots read and scored the way this policy needs."""
    return init_cache(cfg, batch_size, capacity, dtype=dtype, rope_mode=self.rope_mode,
                      score_mode=self.score_mode, score_agg=self.score_agg, state=self.init_state(cfg),
                      stats=self.stats_recording)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    raise NotImplementedError

  def after_prefill(self, params, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
                    lengths: jax.Array) -> KVCache:
    """The prefilled cache, prepared for the hand-off with the model at hand (traced, inside the prefill's jit).

    Args: the model's params and cfg; the cache after the prompt forward; the right-padded prompts tokens [B, T]
    and their lengths [B]. The default changes nothing (KVzip runs its reconstruction pass here).
    """
    del params, cfg, tokens, lengths
    return cache

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

  @property
  def compacts_in_prefill(self) -> bool:
    """Whether the prefill hand-off of a prompt over the budget evicts (False: DecodingPolicy, which compresses
    only during decode, as kvpress's DecodingPress)."""
    return True

  # The scorer interface the wrappers (AdaKV, per-layer budgets, chunking, decoding-time compression) build on.

  def keep_scores(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """(scores, protected): how much each held token is worth keeping by this method, for a wrapper to select
    with its own budgets (kvpress's `ScorerPress.score`).

    Returns:
      scores: [L, B, S, KV] float32, higher = keep (meaningful at occupied slots).
      protected: [L, B, S, KV] bool, tokens the method always keeps (sinks, recent or observation window);
        a wrapper ranks them first.

    Raises:
      NotImplementedError: the policy is not a scorer (full, LaCache, KVMerger).
    """
    raise NotImplementedError(f"{type(self).__name__} is not a scorer policy (it defines no keep_scores)")


def is_scorer(policy: CachePolicy) -> bool:
  """The policy defines `keep_scores` (a wrapper can take it as its inner policy)."""
  return type(policy).keep_scores is not CachePolicy.keep_scores


def ranked_scores(scores: jax.Array, protected: jax.Array) -> jax.Array:
  """Scores with protected tokens at +inf, so that one descending rank puts them first (ties: older)."""
  return jnp.where(protected, jnp.inf, scores.astype(jnp.float32))


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
  `rope_mode` and `max_new_tokens` (and optionally `lean_decode`), and define the prefix budget per layer and
  row (`prefix_budget`) and its largest value (`max_kept`).

  Decode after the hand-off (`lean_decode`, default True): these policies read attention statistics once, in
  the hand-off, and never move a key afterwards. So the hand-off returns a decode cache that records no
  statistic (`score_mode=None`: no probabilities at decode) and, for `rope_mode="original"`, holds its keys
  rotated at their original positions (`rope_mode="stored"`, rotated once instead of at every step). The
  decode attention is then the same function of the same numbers, and the XLA:CPU decode kernel serves it.
  `lean_decode=False` keeps the recording cache through decode (the behaviour before; for benchmarks).
  """

  lean_decode = True

  def init_state(self, cfg: ModelConfig):
    return RopeState(inv_freq=jnp.asarray(rope_lib.inv_frequencies(cfg), jnp.float32))

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

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    """The kept prompt plus the generated tokens (`max_new_tokens`, when set, takes precedence)."""
    if self.max_new_tokens is not None:
      return self.decode_capacity(cfg, prompt_tokens + new_tokens)
    return min(prompt_tokens + new_tokens, self.max_kept() + new_tokens)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    if seen <= self.capacity:
      return np.full(cfg.num_layers, seen)
    return np.asarray(self.prefix_budget(cfg.num_layers, jnp.int32(seen))) + self.window

  def keep_scores(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """The pooled window attention of the prefix; the observation window protected (kvpress's SnapKV gives
    the window the top score)."""
    plans.require_scores(type(self).__name__.removesuffix("Policy"), cache, self.score_mode)
    valid = cache.valid()
    window = plans.recent_mask(valid, self.window)
    pooled = plans.pool_scores(cache.scores, valid & ~window, self.kernel, self.pooling)
    return pooled, window

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
    out = plans.apply_plan(cache, src, jnp.any(prompt_len > self.capacity), capacity)
    return lean_decode_cache(out) if self.lean_decode else out


@flax.struct.dataclass
class RopeState:
  """Policy state holding the model's RoPE inverse frequencies [head_dim // 2] (policies are cfg-free, so a
  policy that rotates keys itself, e.g. `lean_decode_cache`, carries them in the cache)."""

  inv_freq: jax.Array


# The state of the kvpress scorers (`ScorerPolicy`): the same RoPE frequencies, so every wrapper's
# `lean_decode_cache` and every scorer's `scoring_keys` read one state type.
ScorerState = RopeState

def lean_decode_cache(cache: KVCache) -> KVCache:
  """The decode cache of a policy that reads no attention statistic and moves no key after its hand-off.

  Drops the recordings (`strip_recordings`: attention scores and `stats`; the forward then records nothing and
  may use the CPU decode kernel) and, for
  `rope_mode="original"`, rotates every key once at its original position and switches to "stored": the
  keys every later step reads are the same numbers the "original" path computes from pre-RoPE keys (the
  same `rope_lib.rotate` of the same tables), without the per-step rotation. Needs the RoPE frequencies in
  `cache.state` (`RopeState`, or any state with an `inv_freq` field) for "original"; "slot" and "stored"
  keys are left as they are, and so is an int8 cache: rotating its codes would round (and could overflow) them,
  so it keeps "original" and the forward rotates the dequantized keys per step.
  """
  cache = strip_recordings(cache)
  if cache.rope_mode != "original" or cache.quantized:
    return cache
  inv_freq = getattr(cache.state, "inv_freq", None)
  if inv_freq is None:
    raise ValueError("lean_decode_cache needs the RoPE frequencies in cache.state (a RopeState, or a state with "
                     f"an inv_freq field); got state {type(cache.state).__name__}: build the cache with the "
                     "policy's init()")
  cos, sin = rope_lib.rope_table(cache.pos, inv_freq)  # [L, B, S, KV, D]; empty slots (pos -1) rotate by 0
  k = rope_lib.rotate(cache.k, cos, sin)
  out = cache.replace(k=k, rope_mode="stored")
  return out if cache.mesh_rules is None else cache.mesh_rules.constrain_cache(out)


class DelegatingPolicy(CachePolicy):
  """A policy built around another, `inner` (a dataclass field of the subclass): the cache is read and scored
  the way `inner` needs (its `rope_mode`, `score_mode`, `score_agg` and state), and compressed when `inner`
  would be. The base of the wrappers below and of `lacax.cache.int8.Int8KVPolicy`."""

  @property
  def rope_mode(self) -> str:
    return self.inner.rope_mode

  @property
  def score_mode(self):
    return self.inner.score_mode

  @property
  def score_agg(self) -> str:
    return self.inner.score_agg

  @property
  def stats_recording(self):
    return self.inner.stats_recording

  def init_state(self, cfg: ModelConfig):
    return self.inner.init_state(cfg)

  @property
  def compacts_in_decode(self) -> bool:
    return self.inner.compacts_in_decode

  def after_prefill(self, params, cfg, cache, tokens, lengths):
    return self.inner.after_prefill(params, cfg, cache, tokens, lengths)


class WrapperPolicy(DelegatingPolicy):
  """A policy that composes another: `inner` is a scorer policy whose `keep_scores` the wrapper selects from
  with its own budgets, as kvpress's wrappers take any `ScorerPress`.

  The wrapper compresses when the inner one would: at every decode step for a decode-time inner policy (H2O,
  TOVA, StreamingLLM), only in the prefill hand-off for a prompt compressor (SnapKV, PyramidKV), whose decode
  cache is then lean (`lean_decode_cache`) like the inner policy's own.
  """

  def _check_inner(self, owner: str) -> None:
    if not isinstance(self.inner, CachePolicy) or not is_scorer(self.inner):
      name = type(self.inner).__name__
      raise ValueError(f"{owner} inner={name} must be a scorer policy (one defining keep_scores: StreamingLLM, "
                       "H2O, TOVA, SnapKV, PyramidKV or a new scorer); full, LaCache and KVMerger are not")

  def _lean(self, cache: KVCache, capacity: int | None) -> KVCache:
    """The decode cache after a hand-off, lean when the inner policy is a prompt compressor that is."""
    if capacity is not None and not self.compacts_in_decode and getattr(self.inner, "lean_decode", False):
      return lean_decode_cache(cache)
    return cache


class IntervalDecodeWrapper(WrapperPolicy):
  """A wrapper that compresses every `compression_interval` decode steps down to `target_size` (its dataclass
  fields) and never at prefill: the capacities of kvpress's DecodingPress family (Decoding, CaM)."""

  @property
  def compacts_in_decode(self) -> bool:
    return True

  @property
  def compacts_in_prefill(self) -> bool:
    return False

  @property
  def sink_tokens(self) -> int:
    return self.inner.sink_tokens

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    return min(max_tokens, self.target_size + self.compression_interval)

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    return min(prompt_tokens + new_tokens, max(prompt_tokens, self.target_size) + self.compression_interval)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    # The hand-off keeps the whole prompt, so `seen` alone bounds nothing tighter.
    return np.full(cfg.num_layers, seen)


class PromptChunkWrapper(WrapperPolicy):
  """A wrapper that selects from the prompt chunk by chunk, once, in the prefill hand-off (kvpress's
  ChunkPress, ChunkKVPress and BlockPress): subclasses have the fields `inner`, `budget` and `chunk_length`
  (or their own `__post_init__`) and define `keep_mask`; the decode cache holds what the hand-off kept plus the
  generated tokens."""

  owner = "chunk wrapper"  # the name errors give

  def __post_init__(self):
    self._check_inner(self.owner)
    plans.check_int(self.owner, "budget", self.budget, 1)
    plans.check_int(self.owner, "chunk_length", self.chunk_length, 1)

  @property
  def compacts_in_decode(self) -> bool:
    return False

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    return max_tokens

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    return int(np.max(self.max_held(cfg, prompt_tokens))) + new_tokens

  def keep_mask(self, cache: KVCache) -> jax.Array:
    """[L, B, S, KV] bool: the prompt tokens kept in the hand-off."""
    raise NotImplementedError

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """The hand-off keeps `keep_mask` of a prompt over the budget; decode calls keep everything."""
    if capacity is None:
      return cache
    needed = jnp.any(plans.occupancy(cache) > self.budget)
    plan = lambda c: plans.keep_mask_plan(self.keep_mask(c), capacity)  # noqa: E731
    return self._lean(plans.apply_plan(cache, plan, needed, capacity), capacity)


class SelectingWrapper(WrapperPolicy):
  """A wrapper that keeps, per (layer, row, kv head), a mask of the inner policy's tokens (`keep_mask`)
  whenever some plane is over its budget (`over_budget`), holding at most `layer_bounds` tokens per head."""

  def layer_bounds(self, cfg: ModelConfig) -> np.ndarray:
    """[L] int: the most tokens a kv head of each layer keeps after a compression."""
    raise NotImplementedError

  def keep_mask(self, cache: KVCache) -> jax.Array:
    """[L, B, S, KV] bool: the tokens kept when compressing."""
    raise NotImplementedError

  def over_budget(self, cache: KVCache) -> jax.Array:
    """Scalar bool: some plane holds more than its budget (the compression would change something)."""
    raise NotImplementedError

  @property
  def sink_tokens(self) -> int:
    return self.inner.sink_tokens  # protected tokens are always kept

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    if not self.compacts_in_decode:
      return max_tokens
    return min(max_tokens, int(np.max(self.layer_bounds(cfg))) + 1)

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    total = prompt_tokens + new_tokens
    bound = int(np.max(self.layer_bounds(cfg)))
    return min(total, bound + (1 if self.compacts_in_decode else new_tokens))

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.minimum(seen, self.layer_bounds(cfg))

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    if capacity is None and not self.compacts_in_decode:
      return cache
    plan = lambda c: plans.keep_mask_plan(self.keep_mask(c), capacity or c.capacity)  # noqa: E731
    return self._lean(plans.apply_plan(cache, plan, self.over_budget(cache), capacity), capacity)


class HeadAdaptiveWrapper(SelectingWrapper):
  """A selecting wrapper with AdaKV's head-adaptive budgets (`plans.head_adaptive_keep`): subclasses have the
  fields `inner`, `budget` (mean tokens per kv head) and `alpha_safeguard`; a layer keeps KV * budget tokens,
  each head at least its n_safe = max(1, int(budget * alpha_safeguard)) (0 when alpha_safeguard = 0), so a
  head holds at most KV * budget - (KV - 1) * n_safe (AdaKV, CriticalAdaKV)."""

  @property
  def n_safe(self) -> int:
    return max(1, int(self.budget * self.alpha_safeguard)) if self.alpha_safeguard > 0 else 0

  def layer_bounds(self, cfg: ModelConfig) -> np.ndarray:
    kv = cfg.num_kv_heads
    return np.full(cfg.num_layers, max(self.budget, kv * self.budget - (kv - 1) * self.n_safe))

  def over_budget(self, cache: KVCache) -> jax.Array:
    kv = cache.pos.shape[-1]
    return jnp.any(jnp.sum(plans.occupancy(cache), axis=-1) > kv * self.budget)


class ValueNormWrapper:
  """Mixin of the wrappers that read the forward's ||W_o v||_1 (`StatsRecording(value_norm=True)`; CriticalKV,
  CriticalAdaKV), placed before their selecting base: the cache records the norms besides what the inner
  policy records, and after a prefill-only hand-off the decode cache records nothing (unless `lean_decode` is
  False: a composition whose other policy still reads the recordings)."""

  @property
  def stats_recording(self) -> StatsRecording:
    return StatsRecording(value_norm=True).merge(self.inner.stats_recording)

  def _lean(self, cache: KVCache, capacity: int | None) -> KVCache:
    return super()._lean(cache, capacity) if self.lean_decode else cache

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    out = super().compact(cache, capacity)
    if capacity is not None and not self.compacts_in_decode and self.lean_decode:  # nothing reads them later
      out = strip_recordings(out)
    return out


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

    out = plans.apply_plan(cache, plan, jnp.any(plans.occupancy(cache) > self.budget), capacity)
    if capacity is not None and not self.during_decode and out.stats is not None:
      out = out.replace(stats=None)  # a prefill-time scorer reads its statistics once, in the hand-off
    return out

  def keep_scores(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """`score(cache)`, nothing protected beyond what the score itself ranks first (sinks score +inf), so every
    wrapper (AdaKV, per-layer budgets, chunking, decoding-time compression) takes a kvpress scorer as `inner`."""
    self.inv_freq(cache)
    return self.score(cache), jnp.zeros(cache.pos.shape, bool)

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    """The kept prompt plus the generated tokens for a prefill-time scorer (`max_new_tokens`, when set, wins)."""
    if self.during_decode or self.max_new_tokens is not None:
      return self.decode_capacity(cfg, prompt_tokens + new_tokens)
    return min(prompt_tokens + new_tokens, self.budget + new_tokens)
