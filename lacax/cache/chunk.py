"""Chunked prompt compression over any scorer policy (kvpress's ChunkPress).

Reference NVIDIA/kvpress `kvpress/presses/chunk_press.py::ChunkPress`: the prompt is cut into chunks of
`chunk_length` tokens and each chunk keeps its own max(1, int(len_chunk * (1 - r))) best tokens, so that the
kept tokens are spread over the whole prompt.

lacax budgets are tokens: on a P-token prompt with budget n (kvpress's 1 - r = n / P), chunk c keeps
max(1, (len_c * n) // P) tokens (integer arithmetic; kvpress's float `int()` can differ by one where
len_c (1 - r) is within float rounding of an integer).

Differs from kvpress by definition: kvpress re-scores each chunk on its own (`press.score` on the chunk's
hidden states, keys and values; for SnapKV that is the chunk's own last-window queries). lacax's scores come
from the prefill forward over the whole prompt (`keep_scores` of the inner policy), and each chunk selects
within them; a scorer whose score of a token depends only on that token (key norms, StreamingLLM's positions)
gives kvpress's set. Chunks are of cache slots, which at the prefill hand-off are the prompt positions.
Compresses in the hand-off only (kvpress's presses are prefill presses); the decode cache then grows.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy, PromptChunkWrapper, ranked_scores
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig


chunk_counts = plans.chunk_counts  # the NumPy statement of each chunk's share (ChunkPolicy.max_held)


@dataclasses.dataclass(frozen=True)
class ChunkPolicy(PromptChunkWrapper):
  """Each `chunk_length`-slot chunk of the prompt keeps its share of the `budget` (see the module docstring).

  Attributes:
    inner: the scorer policy whose `keep_scores` rank the tokens of each chunk (protected tokens first).
    budget: tokens kept per kv head over the whole prompt (up to the max(1, .) per chunk).
    chunk_length: chunk size in tokens (1024 in kvpress).
  """

  inner: CachePolicy
  budget: int
  chunk_length: int = 1024

  owner = "Chunk"

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.full(cfg.num_layers, int(chunk_counts(seen, self.budget, self.chunk_length).sum()))

  def keep_mask(self, cache: KVCache) -> jax.Array:
    scores, protected = self.inner.keep_scores(cache)
    return plans.chunked_keep(ranked_scores(scores, protected), cache.valid(), self.budget, self.chunk_length)
