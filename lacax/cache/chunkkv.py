"""ChunkKV (arXiv 2502.00299): keep whole chunks of the prompt, ranked by their mean score.

Reference NVIDIA/kvpress `kvpress/presses/chunkkv_press.py::ChunkKVPress`: the inner press scores the whole
prompt; the scores are summed over the kv heads and averaged over each `chunk_length`-token chunk (the last,
partial chunk over its own tokens); the best max(1, int(n_chunks (1 - r))) chunks are kept whole, the same
chunks in every head (a semantic chunk is kept or dropped as a unit). A prompt shorter than one chunk falls
back to the inner press's own top-k.

lacax: budget n tokens on a P-token prompt (kvpress's 1 - r = n / P): max(1, (n_chunks * n) // P) chunks
(integer arithmetic), per batch row (kvpress uses row 0's chunks for the whole batch); the inner policy's
protected tokens score +inf, so a chunk holding one is kept first (kvpress's SnapKV gives its window the top
score too). The fallback keeps the inner policy's protected tokens and best-scored ones, n per head.
Scores come from the prefill forward (`keep_scores`), as in kvpress. Compresses in the hand-off only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy, PromptChunkWrapper, ranked_scores
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig


def chunks_kept(prompt_len: int, budget: int, chunk_length: int) -> int:
  """Chunks a `prompt_len`-token prompt keeps (NumPy statement of the policy's count)."""
  n_chunks = -(-prompt_len // chunk_length)
  return max(1, n_chunks * budget // prompt_len)


@dataclasses.dataclass(frozen=True)
class ChunkKVPolicy(PromptChunkWrapper):
  """Whole chunks of `chunk_length` tokens by their mean inner score (see the module docstring).

  Attributes:
    inner: the scorer policy.
    budget: tokens kept (as whole chunks: the count of chunks is max(1, n_chunks * budget // P)).
    chunk_length: chunk size (20 in kvpress).
  """

  inner: CachePolicy
  budget: int
  chunk_length: int = 20

  owner = "ChunkKV"

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    if seen <= self.budget:
      held = seen
    elif seen < self.chunk_length:
      held = self.budget
    else:
      held = min(seen, chunks_kept(seen, self.budget, self.chunk_length) * self.chunk_length)
    return np.full(cfg.num_layers, held)

  def keep_mask(self, cache: KVCache) -> jax.Array:
    scores, protected = self.inner.keep_scores(cache)
    valid = cache.valid()
    L, B, S, KV = valid.shape
    cl = self.chunk_length
    ranked = ranked_scores(scores, protected)
    token_valid = jnp.any(valid, axis=-1, keepdims=True)  # [L, B, S, 1]
    head_sum = jnp.sum(jnp.where(valid, ranked, 0.0), axis=-1, keepdims=True)
    summed = plans.within_chunks(head_sum, cl, 0.0)[..., 0]  # [L, B, n, cl]
    members = plans.within_chunks(token_valid, cl, False)[..., 0]
    count = jnp.sum(members, axis=-1)
    mean = jnp.where(count > 0, jnp.sum(jnp.where(members, summed, 0.0), axis=-1) / jnp.maximum(count, 1),
                     -jnp.inf)  # [L, B, n]
    prompt = jnp.max(plans.occupancy(cache), axis=-1)  # [L, B]
    n_chunks = -(-prompt // cl)
    kept = jnp.maximum(1, n_chunks * self.budget // jnp.maximum(prompt, 1))
    rank = plans.descending_rank(mean[..., None], (count > 0)[..., None])[..., 0]  # [L, B, n]
    chunk_kept = rank < kept[:, :, None]
    per_token = jnp.repeat(chunk_kept, cl, axis=2)[:, :, :S, None] & valid
    # A prompt shorter than one chunk: the inner policy's own top-`budget` per head.
    top = valid & (plans.descending_rank(ranked, valid) < self.budget)
    return jnp.where((prompt < cl)[:, :, None, None], top, per_token)
