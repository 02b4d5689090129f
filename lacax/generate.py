"""Batched generation: one prefill forward, then the whole decode loop inside `lax.while_loop`.

Prompts of different lengths are right-padded into one [B, T] batch (T rounded up to a bucket so that a
handful of compiled programs serve every prompt length); each row carries its own positions and cache
cursor, so rows decode independently. The decode loop never returns to the host per token: sampling, stop
tokens and the cache policy's compaction all run inside the compiled loop.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import KVCache, StatsRecording, init_cache
from lacax.cache.base import CachePolicy
from lacax.cache.full import FullPolicy
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.sampling import SamplingConfig, greedy_ids, sample


@flax.struct.dataclass
class DecodeState:
  """The carry of the decode loop.

  Attributes:
    cache: the KV cache.
    token: [B] int32 the last chosen token (fed at the next step).
    position: [B] int32 original position `token` will take.
    step: int32 number of tokens generated so far.
    done: [B] bool the row has produced a stop token.
    num_generated: [B] int32 tokens generated per row, the stop token included.
    out: [B, max_new_tokens] int32 generated tokens (pad_id after a row is done).
    rng: PRNG key, or [B, 2] one key per row (`generate_stream(seeds=...)`: a row's samples then depend on its
      own seed only, not on the batch it shares).
    logprobs: None, or [B, max_new_tokens] float32 log-probability of each generated token under the model
      (log-softmax of the raw logits, before temperature / top-k / top-p).
  """

  cache: KVCache
  token: jax.Array
  position: jax.Array
  step: jax.Array
  done: jax.Array
  num_generated: jax.Array
  out: jax.Array
  rng: jax.Array
  logprobs: jax.Array | None = None


@dataclasses.dataclass
class GenerationResult:
  """Generated token ids per row (stop token included, padding removed) and timings."""

  tokens: list[list[int]]
  prefill_seconds: float
  decode_seconds: float
  prompt_tokens: int
  generated_tokens: int

  @property
  def decode_tokens_per_second(self) -> float:
    return self.generated_tokens / max(self.decode_seconds, 1e-9)

  @property
  def prefill_tokens_per_second(self) -> float:
    return self.prompt_tokens / max(self.prefill_seconds, 1e-9)


def _sample_step(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(tokens [B] int32, next rng, log-probs [B] of the chosen tokens) from [B, V] logits; `rng` is one key or
  [B, 2] keys, one per row."""
  if rng.ndim == 2:
    keys = jax.vmap(jax.random.split)(rng)
    rng, key = keys[:, 0], keys[:, 1]
    token = jax.vmap(lambda row, k: sample(row[None], k, sampling)[0])(logits, key)
  else:
    rng, key = jax.random.split(rng)
    token = sample(logits, key, sampling)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), token[:, None], axis=-1)
  return token, rng, logprob[:, 0]


def _is_stop(token: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
  if not stop_ids:
    return jnp.zeros(token.shape, bool)
  return jnp.isin(token, jnp.asarray(stop_ids, jnp.int32))


def prefill_forward(params, tokens: jax.Array, lengths: jax.Array, cache: KVCache, cfg: ModelConfig, *,
                    options: llama.ForwardOptions | None = None) -> tuple[jax.Array, KVCache]:
  """The prompt forward: right-padded prompts [B, T] of `lengths` into `cache`; (logits [B, 1, V] at each row's
  last prompt token, the filled cache). Padding takes position -1 and is never written."""
  t = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  positions = jnp.where(t < lengths[:, None], t, -1)
  return llama.forward(params, tokens, positions, cache, cfg, logits_index=lengths - 1, options=options)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "sampling", "max_new_tokens", "stop_ids",
                                             "decode_capacity", "mesh_rules", "return_logprobs"))
def prefill(params, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, *, cfg: ModelConfig,
            policy: CachePolicy, sampling: SamplingConfig, max_new_tokens: int, stop_ids: tuple[int, ...],
            decode_capacity: int, mesh_rules=None, options: llama.ForwardOptions | None = None,
            return_logprobs: bool = False) -> DecodeState:
  """Runs the prompts through the model and samples the first new token.

  Args:
    params: model parameters.
    tokens: [B, T] int32 right-padded prompts.
    lengths: [B] int32 prompt lengths (>= 1).
    rng: PRNG key, or [B, 2] one key per row.
    mesh_rules: optional `lacax.sharding.MeshRules`: the cache is laid out on its mesh (and keeps the layout
      through the decode loop).
    options: the forward's extension points (`llama.ForwardOptions`: ACT hook, LoRA, subnet masks), a traced
      pytree whose static fields are part of the compiled program's key.
    return_logprobs: also record the log-probability of every generated token (`DecodeState.logprobs`).

  Returns:
    The decode state after one generated token.
  """
  batch, width = tokens.shape
  cache = policy.init(cfg, batch, max(width, decode_capacity))
  if mesh_rules is not None:
    cache = mesh_rules.shard_cache(cache)
  logits, cache = prefill_forward(params, tokens, lengths, cache, cfg, options=options)
  cache = policy.after_prefill(params, cfg, cache, tokens, lengths)  # e.g. KVzip's reconstruction scores
  cache = policy.compact(cache, capacity=decode_capacity)
  if mesh_rules is not None:  # the decode loop receives the cache in the rules' layout
    cache = mesh_rules.constrain_cache(cache)
  first, rng, first_logprob = _sample_step(logits[:, 0], rng, sampling)
  return initial_state(cache, first, lengths, rng, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                       first_logprob=first_logprob if return_logprobs else None)


def initial_state(cache: KVCache, first: jax.Array, lengths: jax.Array, rng: jax.Array, *, max_new_tokens: int,
                  stop_ids: tuple[int, ...], first_logprob: jax.Array | None = None) -> DecodeState:
  """The decode state once the first token [B] has been chosen from the prefill of prompts of `lengths`
  (`first_logprob` [B]: its log-probabilities, to record those of every generated token)."""
  batch = first.shape[0]
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  logprobs = None
  if first_logprob is not None:
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(first_logprob)
  return DecodeState(cache=cache, token=first, position=lengths, step=jnp.int32(1), done=_is_stop(first, stop_ids),
                     num_generated=jnp.ones((batch,), jnp.int32), out=out, rng=rng, logprobs=logprobs)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "sampling", "max_new_tokens", "stop_ids",
                                             "pad_id"), donate_argnames=("state",))
def decode(params, state: DecodeState, *, cfg: ModelConfig, policy: CachePolicy, sampling: SamplingConfig,
           max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int = 0,
           options: llama.ForwardOptions | None = None, until: jax.Array | None = None) -> DecodeState:
  """Generates until every row has stopped or `max_new_tokens` tokens exist, in one compiled loop (every step's
  forward with `options`, as in `prefill`).

  `until` (an int32 scalar, traced: no recompilation) pauses the loop once `state.step` reaches it, so that the
  host can look at the tokens so far (stop strings, streaming) and call `decode` again on the returned state.
  """

  def cond(s: DecodeState):
    running = (s.step < max_new_tokens) & ~jnp.all(s.done)
    return running if until is None else running & (s.step < until)

  def body(s: DecodeState):
    logits, cache = llama.forward(params, s.token[:, None], s.position[:, None], s.cache, cfg, options=options)
    cache = policy.compact(cache)
    token, rng, logprob = _sample_step(logits[:, -1], s.rng, sampling)
    token = jnp.where(s.done, pad_id, token)
    out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.step))
    logprobs = s.logprobs
    if logprobs is not None:
      logprobs = jax.lax.dynamic_update_slice(logprobs, jnp.where(s.done, 0.0, logprob)[:, None], (0, s.step))
    num_generated = s.num_generated + (~s.done).astype(jnp.int32)
    done = s.done | _is_stop(token, stop_ids)
    return DecodeState(cache=cache, token=token, position=s.position + 1, step=s.step + 1, done=done,
                       num_generated=num_generated, out=out, rng=rng, logprobs=logprobs)

  return jax.lax.while_loop(cond, body, state)


def _cache_on_huge_pages(state: DecodeState) -> None:
  """Backs the decode cache's buffers with huge pages before `decode` (`lacax.memory.back_with_huge_pages`).

  Every decode step reads the whole cache, and `decode` updates it in place (its state is donated), so the
  pages collapsed here serve every step. With XLA's 4 KiB pages the attention kernel's key and value loads
  wait on TLB misses. Measured on a 2-core Zen 4 host, SmolLM2-135M bfloat16 through `generate`, pairs
  interleaved in one process with the same tokens: 1.053x the decode tokens/s at 512 tokens of context (10
  pairs, every one faster), 1.095x at 4096 (5 pairs); float32 at 512 0.99x (8 pairs: no change). The collapse
  copies the pages once, about 0.3 ms per MiB (4 ms for the 512-token cache, 30 ms at 4096).
  """
  from lacax import memory  # pylint: disable=g-import-not-at-top

  memory.back_with_huge_pages(state.cache, min_bytes=memory.HUGE_PAGE_BYTES)


@functools.lru_cache(maxsize=64)
def _act_hook(act, cfg: ModelConfig):
  """ACT's deployment hook, one function object per (config, model), so repeated calls reuse the compiled
  programs (visibility is read off the probabilities: the hook runs inside the decode loop)."""
  from lacax.act import calibration  # pylint: disable=g-import-not-at-top

  return calibration.make_probs_hook(act, cfg)


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int = 64, pad_id: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts into [B, T] (T a multiple of `bucket`) and returns (tokens, lengths)."""
  if not prompts:
    raise ValueError("prompts is empty: expected at least one prompt")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError(f"prompt {int(np.argmin(lengths))} is empty: every prompt needs at least one token")
  width = int(-(-lengths.max() // bucket) * bucket)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  return tokens, lengths


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] = (),
             policy: CachePolicy | None = None, seed: int = 0, bucket: int = 64,
             pad_id: int = 0, mesh_rules=None, options: llama.ForwardOptions | None = None,
             act: Any = None) -> GenerationResult:
  """Generates continuations of token-id prompts.

  Args:
    params: model parameters (jax arrays).
    cfg: model config.
    prompts: token-id lists, any lengths.
    max_new_tokens: tokens to generate per row at most (the stop token counts).
    sampling: greedy by default.
    stop_ids: a row stops after producing any of these.
    policy: the cache policy; default the full cache sized for prompt + generation.
    seed: PRNG seed for sampling.
    bucket: prompts are padded to a multiple of this (fewer recompilations).
    pad_id: token written after a row has stopped (never returned).
    mesh_rules: optional `lacax.sharding.MeshRules` (default: one device): prompts split over the batch axes,
      the cache laid out by the rules; pass parameters placed on the same mesh (`MeshRules.shard_params`, or
      `load_model(..., mesh_rules=)` and its `Model.mesh_rules`).
    options: the forward's extension points (`llama.ForwardOptions`), used by the prefill and every decode step.
    act: optional `lacax.act.ACTConfig`: ACT attention calibration on its heads in the prefill and every decode
      step (its probability hook joins `options`); no heads = the plain model.

  Raises:
    ValueError: a prompt does not fit the cache, or an argument is out of range (the message names it).
    lacax.errors.ResourceError: the cache cannot fit in the device's free memory (the message gives the bytes).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  policy = policy or FullPolicy()
  tokens, lengths = pad_prompts(prompts, bucket, pad_id)
  if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
    raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got range "
                     f"[{int(tokens.min())}, {int(tokens.max())}]")
  total = int(lengths.max()) + max_new_tokens
  decode_capacity = policy.run_capacity(cfg, int(lengths.max()), max_new_tokens)
  if isinstance(policy, FullPolicy) and policy.capacity and total > policy.capacity:
    raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens} = {total} tokens "
                     f"exceed the full cache capacity {policy.capacity}")
  statics = dict(cfg=cfg, policy=policy, sampling=sampling, max_new_tokens=max_new_tokens,
                 stop_ids=tuple(int(s) for s in stop_ids))
  if act is not None:
    hook = _act_hook(act, cfg)
    if hook is not None:
      if options is not None and options.probs_hook is not None:
        raise ValueError("generate: act and options.probs_hook both set an attention-probability hook; pass one")
      options = (options or llama.ForwardOptions()).replace(probs_hook=hook)
  from lacax import memory  # pylint: disable=g-import-not-at-top
  from lacax import sharding  # pylint: disable=g-import-not-at-top

  if mesh_rules is None:  # a sharded cache is split over the mesh; one device holds only its blocks
    memory.require_cache_fits(policy, cfg, len(prompts), max(tokens.shape[1], decode_capacity),
                              what=f"generation of {len(prompts)} prompt(s) of up to {total} tokens")
  tokens_in, lengths_in, rng = jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(seed)
  if mesh_rules is not None:
    tokens_in, lengths_in = mesh_rules.put(tokens, ("batch", None)), mesh_rules.put(lengths, ("batch",))
    rng = mesh_rules.put(np.asarray(rng), (None,))
  start = time.perf_counter()
  state = prefill(params, tokens_in, lengths_in, rng, decode_capacity=decode_capacity, mesh_rules=mesh_rules,
                  options=options, **statics)
  jax.block_until_ready(state)
  _cache_on_huge_pages(state)
  mid = time.perf_counter()
  state = decode(params, state, pad_id=pad_id, options=options, **statics)
  # Every process of a multi-host job reads the whole result.
  out, counts = jax.device_get(jax.tree.map(sharding.fully_replicated, (state.out, state.num_generated)))
  end = time.perf_counter()
  rows = [out[b, :counts[b]].tolist() for b in range(len(prompts))]
  return GenerationResult(tokens=rows, prefill_seconds=mid - start, decode_seconds=end - mid,
                          prompt_tokens=int(lengths.sum()), generated_tokens=int(counts.sum()))


@dataclasses.dataclass
class StreamChunk:
  """The generation so far, after one chunk of decode steps of `generate_stream`.

  Attributes:
    tokens: per row, the generated ids so far (a stop token included; nothing after the row stopped).
    logprobs: per row, the log-probability of each of those tokens under the model, or None unless asked.
    done: [B] bool: the row has stopped (a stop token, its `max_new_tokens`, or `stop_rows`).
  """

  tokens: list[list[int]]
  logprobs: list[list[float]] | None
  done: np.ndarray


def generate_stream(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int | Sequence[int], sampling: SamplingConfig = SamplingConfig(),
                    stop_ids: Sequence[int] = (), policy: CachePolicy | None = None,
                    seeds: Sequence[int] | None = None, seed: int = 0, bucket: int = 64, pad_id: int = 0,
                    chunk: int = 8, return_logprobs: bool = False,
                    stop_rows: Callable[[list[list[int]]], Sequence[bool]] | None = None,
                    loop_tokens: int | None = None) -> Iterator[StreamChunk]:
  """`generate`, returning to the host every `chunk` decode steps: for streaming, and for stops the compiled loop
  cannot see (stop strings).

  The same compiled prefill and decode loop as `generate` (one batch, one cache); `decode` is resumed with
  `until = step + chunk`, so a chunk costs one host round trip and no recompilation.

  Args:
    params, cfg, prompts, sampling, stop_ids, policy, bucket, pad_id: as in `generate`.
    max_new_tokens: one limit for every row, or one per row (the loop runs to the largest; a row is marked done
      on the host once it reaches its own, so it may compute up to `chunk - 1` tokens it does not return).
    seeds: one PRNG seed per row: row b samples with its own key `PRNGKey(seeds[b])`, so its tokens do not
      depend on the other rows of the batch. None: one key `PRNGKey(seed)` for the batch, as `generate`.
    chunk: decode steps between returns to the host (>= 1).
    return_logprobs: also return each generated token's log-probability (log-softmax of the raw logits).
    stop_rows: called with the tokens so far after every chunk; rows it answers True for are marked done (their
      later tokens are neither computed further nor returned).
    loop_tokens: the compiled loop's token bound (static; default the largest `max_new_tokens`). A rounded-up
      value lets calls with different limits share one compilation; the loop still ends once every row is done.

  Yields:
    a `StreamChunk` after the first token and after every chunk; the last one has every row done.

  Raises:
    ValueError: as `generate`, or `seeds` / `max_new_tokens` / `chunk` of the wrong length or range.
  """
  batch = len(prompts)
  limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (batch,)).copy()
  if limits.size == 0 or limits.min() < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be >= 1 (one value, or one per prompt)")
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1")
  if seeds is not None and len(seeds) != batch:
    raise ValueError(f"seeds has {len(seeds)} entries; expected one per prompt ({batch})")
  policy = policy or FullPolicy()
  tokens, lengths = pad_prompts(prompts, bucket, pad_id)
  if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
    raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got range "
                     f"[{int(tokens.min())}, {int(tokens.max())}]")
  longest = int(limits.max())
  if loop_tokens is not None:
    if loop_tokens < longest:
      raise ValueError(f"loop_tokens={loop_tokens} must be >= the largest max_new_tokens {longest}")
    longest = int(loop_tokens)
  total = int(lengths.max()) + longest
  if isinstance(policy, FullPolicy) and policy.capacity and total > policy.capacity:
    raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {longest} = {total} tokens "
                     f"exceed the full cache capacity {policy.capacity}")
  statics = dict(cfg=cfg, policy=policy, sampling=sampling, max_new_tokens=longest,
                 stop_ids=tuple(int(s) for s in stop_ids))
  if seeds is None:
    rng = jax.random.PRNGKey(seed)
  else:
    rng = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
  state = prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                  decode_capacity=policy.run_capacity(cfg, int(lengths.max()), longest),
                  return_logprobs=return_logprobs, **statics)
  _cache_on_huge_pages(state)
  while True:
    out, counts, done, logprobs, step = jax.device_get(
        (state.out, state.num_generated, state.done, state.logprobs, state.step))
    counts = np.minimum(counts, limits)
    rows = [out[b, :counts[b]].tolist() for b in range(batch)]
    host_done = np.asarray(done, bool) | (counts >= limits)
    if stop_rows is not None:
      host_done |= np.asarray(stop_rows(rows), bool)
    row_logprobs = None if logprobs is None else [logprobs[b, :counts[b]].tolist() for b in range(batch)]
    if int(step) >= longest:
      host_done[:] = True
    yield StreamChunk(tokens=rows, logprobs=row_logprobs, done=host_done.copy())
    if host_done.all():
      return
    if (host_done != done).any():
      state = state.replace(done=jnp.asarray(host_done))
    state = decode(params, state, pad_id=pad_id, until=jnp.int32(int(step) + chunk), **statics)


# --------------------------------------------------------------------------------------------------------------
# One prefill, many policies (the one-shot evaluation protocol).
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OneShotResult:
  """Greedy outputs of one batch of prompts under several policies.

  Attributes:
    tokens: {policy name: one list of generated ids per prompt (stop token included, padding removed)}.
    policies: {policy name: the policy that ran}.
    prefill_seconds: wall time of the prefill forwards (compilation included on first use of a shape).
    decode_seconds: {policy name: compaction hand-off + decode loop wall time}.
    prompt_tokens: real prompt tokens in the batch.
  """

  tokens: dict[str, list[list[int]]]
  policies: dict[str, CachePolicy]
  prefill_seconds: float
  decode_seconds: dict[str, float]
  prompt_tokens: int


def prefill_signature(policy: CachePolicy) -> tuple:
  """Policies with equal signatures read and record the prefill cache alike, so they can share one prefill:
  (rope_mode, score_mode, score_agg, stats_recording)."""
  return (policy.rope_mode, policy.score_mode, policy.score_agg, policy.stats_recording)


@functools.partial(jax.jit, static_argnames=("cfg", "capacity", "rope_mode", "score_mode", "score_agg", "stats"))
def shared_prefill(params, tokens: jax.Array, lengths: jax.Array, *, cfg: ModelConfig, capacity: int,
                   rope_mode: str, score_mode: str | None, score_agg: str,
                   stats: StatsRecording | None = None) -> tuple[jax.Array, KVCache]:
  """`prefill_forward` into a policy-neutral cache of `capacity` recording what the group's policies read
  (attention by `score_mode`, the statistics of `stats`): (greedy first token [B], the cache)."""
  cache = init_cache(cfg, tokens.shape[0], capacity, rope_mode=rope_mode, score_mode=score_mode,
                     score_agg=score_agg, stats=stats)
  logits, cache = prefill_forward(params, tokens, lengths, cache, cfg)
  return greedy_ids(logits[:, 0]), cache


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "decode_capacity", "max_new_tokens", "stop_ids"))
def _handoff(params, tokens: jax.Array, cache: KVCache, first: jax.Array, lengths: jax.Array, *, cfg: ModelConfig,
             policy: CachePolicy, decode_capacity: int, max_new_tokens: int,
             stop_ids: tuple[int, ...]) -> DecodeState:
  """The policy's one compaction of the shared prefilled cache, and the decode state after the first token.

  The end of `prefill`; the policy's own state (e.g. the ladder cursor per row) is attached to the shared cache
  first.
  """
  cache = cache.replace(state=policy.init(cfg, first.shape[0], 1).state)
  cache = policy.after_prefill(params, cfg, cache, tokens, lengths)
  cache = policy.compact(cache, capacity=decode_capacity)
  return initial_state(cache, first, lengths, jax.random.PRNGKey(0), max_new_tokens=max_new_tokens,
                       stop_ids=stop_ids)


def oneshot_generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                     policies: Mapping[str, CachePolicy], *, max_new_tokens: int, stop_ids: Sequence[int] = (),
                     bucket: int = 64, pad_id: int = 0) -> OneShotResult:
  """Greedy generation of every prompt under every policy, prefilling once per prefill signature.

  For each policy this is `generate(..., policy=policy)`: full-attention prefill, one
  `policy.compact(cache, capacity=policy.run_capacity(...))`, then the compiled decode loop with compaction after
  every token. The prefill forward depends only on how the cache is read and scored (`rope_mode`,
  `score_mode`, `score_agg`), so policies that agree on those (full, StreamingLLM and LaCache; H2O and
  KVMerger) share it: on a CPU the prefill dominates, and this divides the job's time by the number of policies.

  Args:
    params, cfg: the model.
    prompts: token-id lists (right-padded into one batch).
    policies: {name: policy}.
    max_new_tokens: tokens generated per row at most (the stop token counts).
    stop_ids: a row stops after producing one of these.
    bucket: the padded width is a multiple of this (fewer compilations).
    pad_id: written after a row stops (never returned).

  Raises:
    ValueError: no policies, max_new_tokens < 1, or token ids outside the vocabulary.
    lacax.errors.ResourceError: the shared cache does not fit in the device's free memory (the bytes it needs).
  """
  from lacax import memory  # pylint: disable=g-import-not-at-top

  if not policies:
    raise ValueError("oneshot_generate: policies is empty")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  tokens, lengths = pad_prompts(prompts, bucket, pad_id)
  if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
    raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got range "
                     f"[{int(tokens.min())}, {int(tokens.max())}]")
  total = int(lengths.max()) + max_new_tokens
  stops = tuple(int(s) for s in stop_ids)
  groups: dict[tuple, list[str]] = collections.defaultdict(list)
  for name, policy in policies.items():
    groups[prefill_signature(policy)].append(name)

  out: dict[str, list[list[int]]] = {}
  decode_seconds: dict[str, float] = {}
  prefill_seconds = 0.0
  for (rope_mode, score_mode, score_agg, stats), names in groups.items():
    capacities = {name: policies[name].run_capacity(cfg, int(lengths.max()), max_new_tokens) for name in names}
    capacity = max(tokens.shape[1], *capacities.values())
    # The shared cache, plus one compacted copy alive at a time.
    memory.require_cache_fits(policies[names[0]], cfg, len(prompts), capacity, copies=2,
                              what=f"one-shot generation of {len(prompts)} prompt(s) of up to {total} tokens")
    start = time.perf_counter()
    first, cache = shared_prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), cfg=cfg, capacity=capacity,
                                  rope_mode=rope_mode, score_mode=score_mode, score_agg=score_agg, stats=stats)
    jax.block_until_ready(first)
    prefill_seconds += time.perf_counter() - start
    for name in names:
      start = time.perf_counter()
      statics = dict(cfg=cfg, policy=policies[name], max_new_tokens=max_new_tokens, stop_ids=stops)
      state = _handoff(params, jnp.asarray(tokens), cache, first, jnp.asarray(lengths),
                       decode_capacity=capacities[name], **statics)
      _cache_on_huge_pages(state)
      state = decode(params, state, sampling=SamplingConfig(), pad_id=pad_id, **statics)
      generated, counts = jax.device_get((state.out, state.num_generated))
      decode_seconds[name] = time.perf_counter() - start
      out[name] = [generated[b, :counts[b]].tolist() for b in range(len(prompts))]
  return OneShotResult(tokens={name: out[name] for name in policies}, policies=dict(policies),
                       prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                       prompt_tokens=int(lengths.sum()))


def batches_by_policy(items: Sequence[Any], policies_for: Callable[[Any], Mapping[str, CachePolicy]],
                      batch_size: int) -> list[tuple[list[Any], dict[str, CachePolicy]]]:
  """Splits `items` into batches of at most `batch_size` whose items all get the same policies.

  Policies built from a prompt's length (e.g. LaCache's cache_size = budget * prompt tokens) differ between
  prompts of different lengths; a batch shares one static policy per name, so items are grouped by their
  policies first (in order of first appearance), then chunked.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  groups: dict[tuple, tuple[dict[str, CachePolicy], list[Any]]] = {}
  for item in items:
    policies = dict(policies_for(item))
    key = tuple(sorted(policies.items()))
    groups.setdefault(key, (policies, []))[1].append(item)
  batches = []
  for policies, members in groups.values():
    for begin in range(0, len(members), batch_size):
      batches.append((members[begin:begin + batch_size], policies))
  return batches


# --------------------------------------------------------------------------------------------------------------
# Continuing inside the same KV cache (budget forcing: ScaleRTL, arXiv 2506.05566; s1, arXiv 2501.19393).
# --------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_new_tokens", "stop_ids", "return_logprobs"))
def extend(params, state: DecodeState, tokens: jax.Array, lengths: jax.Array, keep: jax.Array, *,
           cfg: ModelConfig, sampling: SamplingConfig, max_new_tokens: int, stop_ids: tuple[int, ...],
           return_logprobs: bool = False) -> DecodeState:
  """Continues rows of a decode state in the same KV cache: a chunked prefill of new tokens, no re-prefill.

  For a full cache only (slot == position). Row b with `lengths[b] > 0` drops what its cache holds from slot
  `keep[b]` on (tokens after a stop, or the pad tokens a finished row kept feeding), appends
  `tokens[b, :lengths[b]]` at positions keep[b], keep[b] + 1, ... and samples its next token from the last
  of them; rows with `lengths[b] == 0` are left as they are and marked done.

  Args:
    state: the decode state of a finished `decode` (its cache, its per-row PRNG keys).
    tokens: [B, T] int32 right-padded tokens to append.
    lengths: [B] int32 tokens of each row to append (0 = the row does not continue).
    keep: [B] int32 cached tokens each continuing row keeps (its prompt and transcript so far).
    max_new_tokens: the new decode state's token bound.

  Returns:
    a fresh decode state (step 1, one token generated per continuing row) over the same cache.
  """
  cache = state.cache
  go = lengths > 0
  keep = jnp.where(go, keep, 0).astype(jnp.int32)
  slot = jnp.arange(cache.capacity, dtype=jnp.int32)
  drop = go[None, :, None, None] & (slot[None, None, :, None] >= keep[None, :, None, None])
  length = jnp.where(go[None, :], jnp.minimum(cache.length, keep[None, :]), cache.length)
  cache = cache.replace(pos=jnp.where(drop, -1, cache.pos), length=length)
  t = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  positions = jnp.where(t < lengths[:, None], keep[:, None] + t, -1)
  logits, cache = llama.forward(params, tokens, positions, cache, cfg, logits_index=jnp.maximum(lengths - 1, 0))
  first, rng, first_logprob = _sample_step(logits[:, 0], state.rng, sampling)
  new = initial_state(cache, first, keep + lengths, rng, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                      first_logprob=first_logprob if return_logprobs else None)
  return new.replace(done=new.done | ~go, num_generated=jnp.where(go, new.num_generated, 0))
