"""Every registered cache policy at one tiny budget: the instances the contract and sharding tests run.

Built through `lacax.cache.registry` (so a new registry entry is covered without editing the tests) from one
small `cache` section sized for the 4-layer test models (the ladder's span must be below the layer count).
"""

from __future__ import annotations

import dataclasses

from lacax.cache import registry
from lacax.cache.base import CachePolicy

# Budget 16; sinks 2; a ladder over 4 layers; SnapKV / PyramidKV windows of 4 pooled by 3; decoding-time
# compression every 4 steps; chunks of 8 (Chunk) and 4 (ChunkKV) tokens.
TINY_CACHE = dict(size=16, start_size=2, span=2, overlap=0, window=4, kernel=3, compression_interval=4,
                  chunk_length=8, chunkkv_length=4)


def tiny_policy(name: str, max_new_tokens: int | None = None) -> CachePolicy:
  """The registered policy `name` at budget 16; `max_new_tokens` sizes prompt-compressing policies' decode
  caches (those with a `max_new_tokens` field) for that many generated tokens."""
  policy = registry.make_policy(name, TINY_CACHE)
  if max_new_tokens is not None and "max_new_tokens" in {f.name for f in dataclasses.fields(policy)}:
    policy = dataclasses.replace(policy, max_new_tokens=max_new_tokens)
  return policy


def streaming_names() -> tuple[str, ...]:
  """Policies that compact at every decode step (so token-by-token streaming exercises them)."""
  return tuple(n for n in registry.policy_names() if tiny_policy(n).compacts_in_decode)


def prefill_names() -> tuple[str, ...]:
  """Policies whose prefill hand-off differs from streaming: prompt compressors and one-shot set-ups."""
  return tuple(n for n in registry.policy_names()
               if not tiny_policy(n).compacts_in_decode or registry.POLICIES[n].prefill is not None)
