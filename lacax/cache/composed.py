"""Composition of two cache policies (kvpress's ComposedPress): the first compacts, then the second.

Reference NVIDIA/kvpress `kvpress/presses/composed_press.py`: the presses run one after the other on the same
prefill, each on what the previous one kept (the retained fractions multiply). In lacax both policies run at
every compaction call, first then second, on one cache: scores travel with their tokens (`gather_slots`), so
the second policy ranks the first one's survivors by the same statistic. One cache records one statistic and
is read one way, so the two must agree on it:

  * `score_mode`: equal, or one of them None (a content-agnostic policy such as StreamingLLM);
  * `score_agg`: equal when both score;
  * `rope_mode`: equal;
  * at most one of them keeps a policy state (`init_state`).

A prompt compressor composed with another keeps its scores through the hand-off (its `lean_decode` is off
inside the composition, since the second policy still reads them); the composed decode cache is lean only when
neither policy compacts during decode. The cache records both policies' other statistics (`stats_recording`,
merged).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lacax.cache.base import CachePolicy, lean_decode_cache
from lacax.cache.kv_cache import KVCache, StatsRecording
from lacax.model.config import ModelConfig


def _without_lean(policy: CachePolicy) -> CachePolicy:
  names = {f.name for f in dataclasses.fields(policy)} if dataclasses.is_dataclass(policy) else set()
  return dataclasses.replace(policy, lean_decode=False) if "lean_decode" in names else policy


@dataclasses.dataclass(frozen=True)
class ComposedPolicy(CachePolicy):
  """`first.compact`, then `second.compact`, at every call (see the module docstring).

  Attributes:
    first, second: cache policies sharing how the cache is read and scored.
  """

  first: CachePolicy
  second: CachePolicy

  def __post_init__(self):
    for name in ("first", "second"):
      if not isinstance(getattr(self, name), CachePolicy):
        raise ValueError(f"Composed {name}={getattr(self, name)!r} must be a CachePolicy")
    a, b = self.first, self.second
    if a.score_mode is not None and b.score_mode is not None:
      if a.score_mode != b.score_mode:
        raise ValueError(f"Composed first={type(a).__name__} records score_mode={a.score_mode!r} but second="
                         f"{type(b).__name__} needs {b.score_mode!r}; one cache records one statistic: compose "
                         "policies with the same score_mode, or with a content-agnostic one")
      if a.score_agg != b.score_agg:
        raise ValueError(f"Composed first score_agg={a.score_agg!r} differs from second score_agg="
                         f"{b.score_agg!r}; give both the same")
    if a.rope_mode != b.rope_mode:
      raise ValueError(f"Composed first rope_mode={a.rope_mode!r} differs from second rope_mode={b.rope_mode!r}; "
                       "one cache is read one way: give both the same")
    lean = any(getattr(p, "lean_decode", False) for p in (a, b))
    object.__setattr__(self, "first", _without_lean(a))
    object.__setattr__(self, "second", _without_lean(b))
    object.__setattr__(self, "_lean", lean and not (a.compacts_in_decode or b.compacts_in_decode))

  @property
  def rope_mode(self) -> str:
    return self.first.rope_mode

  @property
  def score_mode(self):
    return self.first.score_mode if self.first.score_mode is not None else self.second.score_mode

  @property
  def score_agg(self) -> str:
    return self.first.score_agg if self.first.score_mode is not None else self.second.score_agg

  @property
  def stats_recording(self):
    """Both policies' other statistics, recorded by the one cache (e.g. SnapKV then ThinK, kvpress's way of
    running ThinK)."""
    a, b = self.first.stats_recording, self.second.stats_recording
    return b if a is None else StatsRecording.merge(a, b)

  def init_state(self, cfg: ModelConfig):
    states = [p.init_state(cfg) for p in (self.first, self.second)]
    held = [s for s in states if s is not None]
    if len(held) > 1:
      raise ValueError(f"Composed first={type(self.first).__name__} and second={type(self.second).__name__} both "
                       "keep a policy state; compose at most one stateful policy")
    return held[0] if held else None

  @property
  def compacts_in_decode(self) -> bool:
    return self.first.compacts_in_decode or self.second.compacts_in_decode

  @property
  def sink_tokens(self) -> int:
    return min(self.first.sink_tokens, self.second.sink_tokens)

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    return min(self.first.decode_capacity(cfg, max_tokens), self.second.decode_capacity(cfg, max_tokens))

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    return min(self.first.run_capacity(cfg, prompt_tokens, new_tokens),
               self.second.run_capacity(cfg, prompt_tokens, new_tokens))

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.minimum(self.first.max_held(cfg, seen), self.second.max_held(cfg, seen))

  def after_prefill(self, params, cfg, cache, tokens, lengths):
    return self.first.after_prefill(params, cfg, cache, tokens, lengths)  # the first sees the prefilled cache

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    # Hand-off: the first policy compresses in place (same slot count, so a prompt compressor runs), the second
    # compresses into the decode cache.
    cache = self.first.compact(cache, None if capacity is None else cache.capacity)
    cache = self.second.compact(cache, capacity)
    return lean_decode_cache(cache) if capacity is not None and self._lean else cache
