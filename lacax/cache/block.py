"""Block-wise iterative prompt compression over any scorer policy (kvpress's BlockPress; KeyDiff, arXiv
2504.15364, simulating block prompt processing).

Reference NVIDIA/kvpress `presses/block_press.py::BlockPress.compress`: with a budget of n tokens per kv head
and a P-token prompt, the first n tokens are kept; then for each block of `block_size` tokens from n on, the
inner press re-scores the kept tokens together with the block (`press.score` on exactly those keys, values and
hidden states) and the n best become the kept tokens. A prompt of at most n tokens is left alone.

lacax does the same on the cache: each step gathers the kept slots and the block's slots into a cache of
n + block_size slots (`gather_slots`, in slot order: the kept ones ascending, then the block) and ranks them
by the inner policy's `keep_scores` of that cache, so a scorer whose score depends on the set it is given
(KeyDiff's mean key, LagKV's partitions, SnapKV's window being the sub-cache's last tokens) sees what
kvpress's sees. Differs from kvpress where the inner score reads the prefill forward's attention: SnapKV's
recorded window attention is that of the whole prompt's last queries (gathered), whereas kvpress recomputes it
with the block's last queries over the kept tokens and the block. kvpress orders the kept tokens by score
before the block; lacax by position (a scorer that depends on the order, e.g. by the last tokens, sees the
original order). Ties go to the older token. The blocks are a `lax.scan` over ceil((S - n) / block_size)
steps of the prefill cache's S slots; a shorter row's blocks past its prompt are empty and change nothing.
Compresses in the prefill hand-off only (kvpress's presses are prefill presses); the decode cache then grows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy, PromptChunkWrapper, ranked_scores
from lacax.cache.kv_cache import KVCache, gather_slots
from lacax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class BlockPolicy(PromptChunkWrapper):
  """The prompt compressed block by block to `budget` tokens per (layer, row, kv head) (see the module docstring).

  Attributes:
    inner: the scorer policy that re-scores the kept tokens and each block (`keep_scores`, protected first).
    budget: tokens kept per kv head (kvpress: int(k_len * (1 - compression_ratio))).
    block_size: tokens per block (128 in kvpress).
  """

  inner: CachePolicy
  budget: int
  block_size: int = 128

  owner = "Block"

  def __post_init__(self):
    self._check_inner(self.owner)
    plans.check_int(self.owner, "budget", self.budget, 1)
    plans.check_int(self.owner, "block_size", self.block_size, 1)

  @property
  def sink_tokens(self) -> int:
    return min(self.inner.sink_tokens, self.budget)  # protected in every sub-cache, among the first kept

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.full(cfg.num_layers, min(seen, self.budget))

  def kept_slots(self, cache: KVCache) -> jax.Array:
    """[L, B, budget, KV] int32: the kept slots of every (layer, row, kv head), ascending, -1 = none."""
    L, B, S, KV = cache.pos.shape
    n, size = self.budget, self.block_size
    slot = jnp.arange(S, dtype=jnp.int32)
    first = jnp.where(cache.valid()[:, :, :n], slot[None, None, :n, None], -1)
    offsets = jnp.arange(size, dtype=jnp.int32)

    def step(kept, start):
      block = start + offsets
      block = jnp.broadcast_to(jnp.where(block < S, block, -1)[None, None, :, None], (L, B, size, KV))
      src = jnp.concatenate([kept, block], axis=2)  # [L, B, n + size, KV]
      sub = gather_slots(cache, src, impl="reference")
      scores, protected = self.inner.keep_scores(sub)
      valid = sub.valid()
      keep = valid & (plans.descending_rank(ranked_scores(scores, protected), valid) < n)
      picked = plans.keep_mask_plan(keep, n)  # indices into src, ascending
      return jnp.where(picked >= 0, jnp.take_along_axis(src, jnp.maximum(picked, 0), axis=2), -1), None

    starts = n + size * jnp.arange(-(-(S - n) // size), dtype=jnp.int32)
    kept, _ = jax.lax.scan(step, first, starts)
    return kept

  def keep_mask(self, cache: KVCache) -> jax.Array:
    S = cache.capacity
    if S <= self.budget:
      return cache.valid()
    kept = self.kept_slots(cache)
    mask = jnp.zeros(cache.pos.shape[:2] + (S + 1, cache.pos.shape[3]), bool)
    mask = jnp.put_along_axis(mask, jnp.where(kept >= 0, kept, S), True, axis=2, inplace=False)
    return mask[:, :, :S] & cache.valid()
