"""Every registered cache policy at one tiny budget: the instances the contract and sharding tests run.

Built through `lacax.cache.registry` (so a new registry entry is covered without editing the tests) from one
small `cache` section sized for the 4-layer test models (the ladder's span must be below the layer count).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import tempfile

import numpy as np

from lacax.cache import expected_attention, qfilter, registry
from lacax.cache.base import CachePolicy

_TMP = tempfile.mkdtemp(prefix="lacax_cache_policies_")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def qfilter_file(num_layers: int, num_kv_heads: int, head_dim: int) -> str:
  """A Q-Filter file of unit random filters for a model of that shape (the contract needs any valid file)."""
  filters = np.random.RandomState(0).randn(num_layers, num_kv_heads, head_dim).astype(np.float32)
  path = os.path.join(_TMP, f"qfilters_{num_layers}x{num_kv_heads}x{head_dim}.npz")
  qfilter.save(path, filters / np.linalg.norm(filters, axis=-1, keepdims=True))
  return path


@functools.lru_cache(maxsize=None)
def expected_attention_file(num_layers: int, num_heads: int, head_dim: int) -> str:
  """ExpectedAttention query statistics (random means, random positive-definite covariances) of that shape."""
  rng = np.random.RandomState(1)
  mean = rng.randn(num_layers, num_heads, head_dim)
  factor = rng.randn(num_layers, num_heads, head_dim, head_dim) / np.sqrt(head_dim)
  path = os.path.join(_TMP, f"ea_stats_{num_layers}x{num_heads}x{head_dim}.npz")
  expected_attention.save(path, mean, factor @ np.swapaxes(factor, -1, -2))
  return path


def duo_head_scores(num_layers: int, num_kv_heads: int) -> tuple:
  """Distinct random DuoAttention head scores [layers][kv_heads] (the contract needs any valid pattern)."""
  scores = np.random.RandomState(2).permutation(num_layers * num_kv_heads) / (num_layers * num_kv_heads)
  return tuple(tuple(float(x) for x in row) for row in scores.reshape(num_layers, num_kv_heads))


# Budget 16; sinks 2; a ladder over 4 layers; SnapKV / PyramidKV windows of 4 pooled by 3; decoding-time
# compression every 4 steps; chunks of 8 (Chunk) and 4 (ChunkKV) tokens; LagKV partitions of 4 (so that the
# 29- and 40-token prompts are scored by partition); Q-Filters and ExpectedAttention statistics for the
# contract's tiny model (4 layers, 4 heads, 2 kv heads of 8; `tiny_policy(..., cfg=...)` picks the files of
# another model); a SimLayerKV threshold of 0.3, since a random model's attention is spread about evenly (the
# 16 initial + recent tokens of a 29- or 40-token prompt get about 0.4-0.6 of it, so its layers are lazy); half
# of DuoAttention's heads streaming, by random scores for the model's shape.
TINY_CACHE = dict(size=16, start_size=2, span=2, overlap=0, window=4, kernel=3, compression_interval=4,
                  chunk_length=8, chunkkv_length=4, lag_size=4, lazy_threshold=0.3,
                  qfilter_path=qfilter_file(4, 2, 8), expected_attention_stats=expected_attention_file(4, 4, 8),
                  head_compression_ratio=0.5, duo_head_scores=duo_head_scores(4, 2))


def tiny_policy(name: str, max_new_tokens: int | None = None, cfg=None) -> CachePolicy:
  """The registered policy `name` at budget 16; `max_new_tokens` sizes prompt-compressing policies' decode
  caches (those with a `max_new_tokens` field) for that many generated tokens; `cfg` (default: the contract's
  tiny model) fixes the shape of the Q-Filter file and of DuoAttention's head scores."""
  cache = TINY_CACHE
  if cfg is not None:
    cache = {**cache, "qfilter_path": qfilter_file(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim),
             "expected_attention_stats": expected_attention_file(cfg.num_layers, cfg.num_heads, cfg.head_dim),
             "duo_head_scores": duo_head_scores(cfg.num_layers, cfg.num_kv_heads)}
  policy = registry.make_policy(name, cache)
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


def kept_positions(cache) -> dict:
  """{(layer, row, kv head): sorted original positions the cache holds}."""
  pos = np.asarray(cache.pos)
  return {(l, b, h): sorted(int(p) for p in pos[l, b, :, h] if p >= 0)
          for l in range(pos.shape[0]) for b in range(pos.shape[1]) for h in range(pos.shape[3])}


def top_budget(score: np.ndarray, budget: int) -> list[int]:
  """Positions of the `budget` largest scores (ties: the older token), sorted."""
  return sorted(np.argsort(-score, kind="stable")[:budget].tolist())
