"""Key re-rotation (kvpress's KeyRerotationPress): kept keys re-rotated to contiguous positions.

Reference NVIDIA/kvpress `kvpress/presses/key_rerotation_press.py`: after the inner press keeps n of a prompt's
keys (cached post-RoPE at their original positions), they are re-rotated to positions 0..n-1 in their kept
order. lacax caches keys before RoPE, so no re-rotation pass is needed: the wrapper reads the cache in
`rope_mode="slot"`, where every key is rotated at its slot, and kept keys are front-packed in time order, so
the kept prompt keys sit at 0..n-1 exactly as in kvpress.

Differs from kvpress by definition after the prompt: kvpress's pipeline keeps feeding the question and the
answer at the *original* positions (from P on, `pipeline.py::generate_answer`), leaving a gap of P - n
positions after the re-rotated context; in lacax's slot mode the next tokens continue at slot n, n + 1, ...
(the StreamingLLM / LaCache position shift), so there is no gap, and a decode-time inner policy's evictions
re-position the survivors again at every step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lacax.cache.base import CachePolicy, WrapperPolicy
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class KeyRerotationPolicy(WrapperPolicy):
  """`inner` with its keys read at their slots (contiguous positions) instead of their original positions.

  Attributes:
    inner: a scorer policy whose keys are cached pre-RoPE (rope_mode "slot" or "original", not "stored").
  """

  inner: CachePolicy

  def __post_init__(self):
    self._check_inner("KeyRerotation")
    if self.inner.rope_mode == "stored":
      raise ValueError(f"KeyRerotation inner={type(self.inner).__name__} has rope_mode='stored' (keys cached "
                       "rotated at their original positions); re-rotation needs pre-RoPE keys: use 'original'")

  @property
  def rope_mode(self) -> str:
    return "slot"

  @property
  def sink_tokens(self) -> int:
    return self.inner.sink_tokens

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    return self.inner.decode_capacity(cfg, max_tokens)

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    return self.inner.run_capacity(cfg, prompt_tokens, new_tokens)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return self.inner.max_held(cfg, seen)

  def keep_scores(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    return self.inner.keep_scores(cache)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    return self.inner.compact(cache, capacity)
