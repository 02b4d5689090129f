"""Batched generation: one prefill forward, then the whole decode loop inside `lax.while_loop`.

Prompts of different lengths are right-padded into one [B, T] batch (T rounded up to a bucket so that a
handful of compiled programs serve every prompt length); each row carries its own positions and cache
cursor, so rows decode independently. The decode loop never returns to the host per token: sampling, stop
tokens and the cache policy's compaction all run inside the compiled loop.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import KVCache
from lacax.cache.policy import CachePolicy, FullPolicy
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.sampling import SamplingConfig, sample


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
    rng: PRNG key.
  """

  cache: KVCache
  token: jax.Array
  position: jax.Array
  step: jax.Array
  done: jax.Array
  num_generated: jax.Array
  out: jax.Array
  rng: jax.Array


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


def _is_stop(token: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
  if not stop_ids:
    return jnp.zeros(token.shape, bool)
  return jnp.isin(token, jnp.asarray(stop_ids, jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "sampling", "max_new_tokens", "stop_ids",
                                             "decode_capacity", "mesh_rules"))
def prefill(params, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, *, cfg: ModelConfig,
            policy: CachePolicy, sampling: SamplingConfig, max_new_tokens: int, stop_ids: tuple[int, ...],
            decode_capacity: int, mesh_rules=None, options: llama.ForwardOptions | None = None) -> DecodeState:
  """Runs the prompts through the model and samples the first new token.

  Args:
    params: model parameters.
    tokens: [B, T] int32 right-padded prompts.
    lengths: [B] int32 prompt lengths (>= 1).
    rng: PRNG key.
    mesh_rules: optional `lacax.sharding.MeshRules`: the cache is laid out on its mesh (and keeps the layout
      through the decode loop).
    options: the forward's extension points (`llama.ForwardOptions`: ACT hook, LoRA, subnet masks), a traced
      pytree whose static fields are part of the compiled program's key.

  Returns:
    The decode state after one generated token.
  """
  batch, width = tokens.shape
  t = jnp.arange(width, dtype=jnp.int32)[None, :]
  positions = jnp.where(t < lengths[:, None], t, -1)
  cache = policy.init(cfg, batch, max(width, decode_capacity))
  if mesh_rules is not None:
    cache = mesh_rules.shard_cache(cache)
  logits, cache = llama.forward(params, tokens, positions, cache, cfg, logits_index=lengths - 1, options=options)
  cache = policy.compact(cache, capacity=decode_capacity)
  if mesh_rules is not None:  # the decode loop receives the cache in the rules' layout
    cache = mesh_rules.constrain_cache(cache)
  rng, key = jax.random.split(rng)
  first = sample(logits[:, 0], key, sampling)
  return initial_state(cache, first, lengths, rng, max_new_tokens=max_new_tokens, stop_ids=stop_ids)


def initial_state(cache: KVCache, first: jax.Array, lengths: jax.Array, rng: jax.Array, *, max_new_tokens: int,
                  stop_ids: tuple[int, ...]) -> DecodeState:
  """The decode state once the first token [B] has been chosen from the prefill of prompts of `lengths`."""
  batch = first.shape[0]
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  return DecodeState(cache=cache, token=first, position=lengths, step=jnp.int32(1), done=_is_stop(first, stop_ids),
                     num_generated=jnp.ones((batch,), jnp.int32), out=out, rng=rng)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "sampling", "max_new_tokens", "stop_ids",
                                             "pad_id"), donate_argnames=("state",))
def decode(params, state: DecodeState, *, cfg: ModelConfig, policy: CachePolicy, sampling: SamplingConfig,
           max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int = 0,
           options: llama.ForwardOptions | None = None) -> DecodeState:
  """Generates until every row has stopped or `max_new_tokens` tokens exist, in one compiled loop (every step's
  forward with `options`, as in `prefill`)."""

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState):
    logits, cache = llama.forward(params, s.token[:, None], s.position[:, None], s.cache, cfg, options=options)
    cache = policy.compact(cache)
    rng, key = jax.random.split(s.rng)
    token = sample(logits[:, -1], key, sampling)
    token = jnp.where(s.done, pad_id, token)
    out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.step))
    num_generated = s.num_generated + (~s.done).astype(jnp.int32)
    done = s.done | _is_stop(token, stop_ids)
    return DecodeState(cache=cache, token=token, position=s.position + 1, step=s.step + 1, done=done,
                       num_generated=num_generated, out=out, rng=rng)

  return jax.lax.while_loop(cond, body, state)


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
    mesh_rules: optional `lacax.sharding.MeshRules` (default: the one of an enclosing
      `lacax.sharding.use_mesh_rules`): prompts split over the batch axes, the cache laid out by the rules;
      pass parameters placed on the same mesh (`MeshRules.shard_params` or `load_model(..., mesh_rules=)`).
    options: the forward's extension points (`llama.ForwardOptions`), used by the prefill and every decode step.
    act: optional `lacax.act.ACTConfig`: ACT attention calibration on its heads in the prefill and every decode
      step (its probability hook joins `options`); no heads = the plain model.

  Raises:
    ValueError: a prompt does not fit the cache, or an argument is out of range (the message names it).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  policy = policy or FullPolicy()
  tokens, lengths = pad_prompts(prompts, bucket, pad_id)
  if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
    raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got range "
                     f"[{int(tokens.min())}, {int(tokens.max())}]")
  total = int(lengths.max()) + max_new_tokens
  decode_capacity = policy.slots(cfg, total)
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
  from lacax import sharding  # pylint: disable=g-import-not-at-top

  mesh_rules = mesh_rules or sharding.current_mesh_rules()
  tokens_in, lengths_in, rng = jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(seed)
  if mesh_rules is not None:
    tokens_in, lengths_in = mesh_rules.put(tokens, ("batch", None)), mesh_rules.put(lengths, ("batch",))
    rng = mesh_rules.put(np.asarray(rng), (None,))
  start = time.perf_counter()
  state = prefill(params, tokens_in, lengths_in, rng, decode_capacity=decode_capacity, mesh_rules=mesh_rules,
                  options=options, **statics)
  jax.block_until_ready(state)
  mid = time.perf_counter()
  state = decode(params, state, pad_id=pad_id, options=options, **statics)
  # Every process of a multi-host job reads the whole result.
  out, counts = jax.device_get(jax.tree.map(sharding.fully_replicated, (state.out, state.num_generated)))
  end = time.perf_counter()
  rows = [out[b, :counts[b]].tolist() for b in range(len(prompts))]
  return GenerationResult(tokens=rows, prefill_seconds=mid - start, decode_seconds=end - mid,
                          prompt_tokens=int(lengths.sum()), generated_tokens=int(counts.sum()))
