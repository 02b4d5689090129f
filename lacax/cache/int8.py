"""int8 KV caches for every policy: `Int8KVPolicy(policy)` is `policy` with its cache stored as int8.

Keys and values are quantized when the forward writes them (symmetric, one float32 scale per token and kv
head: `lacax.cache.kv_cache.quantize_kv`, as Edge-LLM's `kv_bits` quantizer, arXiv 2406.15758) and dequantized
when a layer reads them. Compaction plans move the scales with their slots (`gather_slots`), and KVMerger merges
dequantized values, so the wrapper changes only how the cache is created: LaCache, StreamingLLM, the full cache
and the score-based baselines all run on it unchanged. Resident KV bytes fall from 4 (float32) or 2 (bfloat16)
per element to 1 + 4 / head_dim (the scale).

From a config: `cache.kv_bits=8` (`lacax.cache.registry.make_policy` wraps the policy); 16 or 32 (or unset)
keeps the float cache.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lacax.cache.base import CachePolicy, DelegatingPolicy
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig

KV_BITS = (8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Int8KVPolicy(DelegatingPolicy):
  """`inner` with an int8 cache (per-token scales); every other behaviour and field is `inner`'s."""

  inner: CachePolicy

  def __getattr__(self, name):  # fields of the wrapped policy (budget, capacity, span, ...)
    inner = self.__dict__.get("inner")
    if inner is None or name.startswith("__"):
      raise AttributeError(name)
    return getattr(inner, name)

  @property
  def name(self) -> str:
    return f"{self.inner.name}+int8"

  @property
  def sink_tokens(self) -> int:
    return self.inner.sink_tokens

  @property
  def compacts_in_prefill(self) -> bool:
    return self.inner.compacts_in_prefill

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    return self.inner.decode_capacity(cfg, max_tokens)

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    return self.inner.run_capacity(cfg, prompt_tokens, new_tokens)

  def init(self, cfg: ModelConfig, batch_size: int, capacity: int, *, dtype=None) -> KVCache:
    del dtype  # the point of the wrapper
    return self.inner.init(cfg, batch_size, capacity, dtype=jnp.int8)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    return self.inner.compact(cache, capacity)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return self.inner.max_held(cfg, seen)


def with_kv_bits(policy: CachePolicy, kv_bits: int | None) -> CachePolicy:
  """`policy` with an int8 cache for kv_bits=8; unchanged for None, 16 or 32 (the float dtype decides)."""
  if kv_bits is None or kv_bits in (16, 32):
    return policy
  if kv_bits != 8 or isinstance(kv_bits, bool):
    raise ValueError(f"cache.kv_bits={kv_bits!r} is not supported; expected one of {KV_BITS} (8 = int8 KV with "
                     "per-token scales)")
  return policy if isinstance(policy, Int8KVPolicy) else Int8KVPolicy(policy)
