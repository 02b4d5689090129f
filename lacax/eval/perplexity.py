"""Token-by-token streaming perplexity: the evaluation protocol of StreamingLLM and LaCache.

The text is fed one token at a time from an empty cache; after every step the NLL of the next token is taken
and the cache policy compacts (StreamingLLM `examples/eval_long_ppl.py`, LaCache `ppl/run.py`). PPL =
exp(mean NLL). The loop over tokens is a `lax.scan` compiled once per (policy, chunk length); the host only
sees chunk boundaries (for the progress bar), never individual tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import KVCache
from lacax.cache.base import CachePolicy
from lacax.model import llama
from lacax.model.config import ModelConfig


@dataclasses.dataclass
class StreamResult:
  """NLL of every predicted token, the final cache and the measured speed."""

  nll: np.ndarray  # [B, N - 1] float32: nll[:, t] = -log p(token t+1 | tokens <= t, cache)
  cache: KVCache
  seconds: float  # wall time of the streaming loop, compilation excluded
  compile_seconds: float

  @property
  def ppl(self) -> float:
    return float(np.exp(self.nll.mean()))

  @property
  def tokens_per_second(self) -> float:
    return self.nll.size / max(self.seconds, 1e-9)

  def running_ppl(self) -> np.ndarray:
    """[N - 1] perplexity of the first t+1 predictions, averaged over the batch."""
    nll = self.nll.mean(axis=0)
    return np.exp(np.cumsum(nll) / np.arange(1, nll.size + 1))


@functools.partial(jax.jit, static_argnames=("cfg", "policy"), donate_argnames=("cache",))
def stream_chunk(params, cache: KVCache, tokens: jax.Array, targets: jax.Array, positions: jax.Array, *,
                 cfg: ModelConfig, policy: CachePolicy) -> tuple[KVCache, jax.Array]:
  """Streams one chunk of tokens through the model, one token per step.

  Args:
    params: model parameters.
    cache: the cache after the previous chunk.
    tokens: [B, T] int32 tokens fed at the T steps.
    targets: [B, T] int32 the tokens to predict (the next ones).
    positions: [B, T] int32 original positions of `tokens`; -1 marks padding steps at the end of the last
      chunk (nothing is written, the policy sees an unchanged cache).

  Returns:
    The cache after the chunk and the NLL [B, T] float32 (0 at padding steps).
  """

  def step(cache, inputs):
    token, target, position = inputs
    logits, cache = llama.forward(params, token[:, None], position[:, None], cache, cfg)
    cache = policy.compact(cache)
    logits = logits[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    return cache, jnp.where(position >= 0, nll, 0.0)

  cache, nll = jax.lax.scan(step, cache, (tokens.T, targets.T, positions.T))
  return cache, nll.T


def streaming_nll(params, cfg: ModelConfig, tokens: np.ndarray, policy: CachePolicy, *, chunk: int = 256,
                  progress: Callable[[int, float], None] | None = None, mesh_rules=None) -> StreamResult:
  """Streams `tokens` [B, N] (or [N]) token by token under `policy`.

  Args:
    params: model parameters.
    cfg: model config.
    tokens: [B, N] or [N] int token ids; N >= 2.
    policy: the cache policy (compaction runs after every step).
    chunk: steps per compiled scan; the host reports progress between chunks.
    progress: optional callback(tokens_done, seconds_elapsed) called after every chunk.
    mesh_rules: optional `lacax.sharding.MeshRules`: the cache is created in the rules' layout (each device
      allocating only its blocks) and keeps it through the stream; pass parameters placed on the same mesh.

  Returns:
    A `StreamResult`; nll[:, t] is the NLL of token t + 1.
  """
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim == 1:
    tokens = tokens[None]
  batch, n = tokens.shape
  if n < 2:
    raise ValueError(f"streaming perplexity needs at least 2 tokens, got {n}")
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1")
  steps = n - 1
  padded = -(-steps // chunk) * chunk
  feed = np.zeros((batch, padded), np.int32)
  targets = np.zeros((batch, padded), np.int32)
  positions = np.full((batch, padded), -1, np.int32)
  feed[:, :steps], targets[:, :steps] = tokens[:, :-1], tokens[:, 1:]
  positions[:, :steps] = np.arange(steps, dtype=np.int32)

  capacity = policy.decode_capacity(cfg, steps)
  if mesh_rules is None:
    cache = policy.init(cfg, batch, capacity)
  else:
    cache = mesh_rules.create_cache(lambda: policy.init(cfg, batch, capacity))
  compile_start = time.perf_counter()
  compiled = stream_chunk.lower(params, cache, feed[:, :chunk], targets[:, :chunk], positions[:, :chunk],
                                cfg=cfg, policy=policy).compile()
  compile_seconds = time.perf_counter() - compile_start
  nll = []
  start = time.perf_counter()
  for begin in range(0, padded, chunk):
    window = slice(begin, begin + chunk)
    cache, chunk_nll = compiled(params, cache, feed[:, window], targets[:, window], positions[:, window])
    nll.append(np.asarray(chunk_nll))  # blocks: the progress bar shows real time
    if progress is not None:
      progress(min(begin + chunk, steps), time.perf_counter() - start)
  seconds = time.perf_counter() - start
  return StreamResult(nll=np.concatenate(nll, axis=1)[:, :steps], cache=cache, seconds=seconds,
                      compile_seconds=compile_seconds)


def teacher_forced_nll(params, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
  """[B, N - 1] NLL of one full-attention forward over the whole sequence (the no-cache reference)."""
  from lacax.cache.kv_cache import init_cache  # pylint: disable=g-import-not-at-top

  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim == 1:
    tokens = tokens[None]
  batch, n = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  logits, _ = jax.jit(llama.forward, static_argnames="cfg")(params, jnp.asarray(tokens), positions,
                                                           init_cache(cfg, batch, n), cfg=cfg)
  logits = logits[:, :-1]
  target = jnp.asarray(tokens[:, 1:])
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  return np.asarray(nll)
