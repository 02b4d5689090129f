"""Prefill and decoding compression together (kvpress's PrefillDecodingPress).

Reference NVIDIA/kvpress `kvpress/presses/prefill_decoding_press.py`: one press compresses the prompt, a
`DecodingPress` compresses during decoding. In lacax the prefill policy runs in the hand-off and the decoding
policy (`lacax.cache.decoding.DecodingPolicy`) at every decode step, on one cache, which therefore records one
statistic and is read one way: the two must agree on `score_mode` (or the prefill policy records none) and
`rope_mode`. The prefill policy keeps its scores through the hand-off (its `lean_decode` is off here: the
decoding policy reads them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import numpy as np

from lacax.cache.base import CachePolicy
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig


@flax.struct.dataclass
class PrefillDecodingState:
  prefill: Any = None
  decoding: Any = None


@dataclasses.dataclass(frozen=True)
class PrefillDecodingPolicy(CachePolicy):
  """`prefill` compresses the prompt in the hand-off; `decoding` (a DecodingPolicy) compresses during decode.

  Attributes:
    prefill: any cache policy (SnapKV, PyramidKV, a wrapper, ...).
    decoding: a `DecodingPolicy` (its inner scorer's statistic is recorded through decode).
  """

  prefill: CachePolicy
  decoding: CachePolicy

  def __post_init__(self):
    if not isinstance(self.prefill, CachePolicy):
      raise ValueError(f"PrefillDecoding prefill={self.prefill!r} must be a CachePolicy")
    if not (isinstance(self.decoding, CachePolicy) and type(self.decoding).__name__ == "DecodingPolicy"):
      raise ValueError(f"PrefillDecoding decoding={type(self.decoding).__name__} must be a DecodingPolicy")
    a, b = self.prefill, self.decoding
    if a.score_mode is not None and a.score_mode != b.score_mode:
      raise ValueError(f"PrefillDecoding prefill={type(a).__name__} records score_mode={a.score_mode!r} but the "
                       f"decoding policy needs {b.score_mode!r}; one cache records one statistic: give both "
                       "the same score_mode")
    if a.score_mode is not None and a.score_agg != b.score_agg:
      raise ValueError(f"PrefillDecoding prefill score_agg={a.score_agg!r} differs from decoding score_agg="
                       f"{b.score_agg!r}")
    if a.rope_mode != b.rope_mode:
      raise ValueError(f"PrefillDecoding prefill rope_mode={a.rope_mode!r} differs from decoding rope_mode="
                       f"{b.rope_mode!r}; one cache is read one way: give both the same")
    names = {f.name for f in dataclasses.fields(a)} if dataclasses.is_dataclass(a) else set()
    if "lean_decode" in names:
      object.__setattr__(self, "prefill", dataclasses.replace(a, lean_decode=False))

  @property
  def rope_mode(self) -> str:
    return self.decoding.rope_mode

  @property
  def score_mode(self):
    return self.decoding.score_mode

  @property
  def score_agg(self) -> str:
    return self.decoding.score_agg

  @property
  def stats_recording(self):
    a, b = self.prefill.stats_recording, self.decoding.stats_recording
    return b if a is None else a.merge(b)

  def init_state(self, cfg: ModelConfig) -> PrefillDecodingState:
    return PrefillDecodingState(self.prefill.init_state(cfg), self.decoding.init_state(cfg))

  @property
  def sink_tokens(self) -> int:
    return min(self.prefill.sink_tokens, self.decoding.sink_tokens)

  @property
  def compacts_in_prefill(self) -> bool:
    return self.prefill.compacts_in_prefill

  def _kept(self, cfg: ModelConfig, prompt_tokens: int) -> int:
    return int(np.max(self.prefill.max_held(cfg, prompt_tokens)))

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    return self.decoding.decode_capacity(cfg, max_tokens)

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    d = self.decoding
    return min(prompt_tokens + new_tokens,
               max(self._kept(cfg, prompt_tokens), d.target_size) + d.compression_interval)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    d = self.decoding
    bound = np.maximum(self.prefill.max_held(cfg, seen), d.target_size) + d.compression_interval
    return np.minimum(seen, bound)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    state = cache.state
    if not isinstance(state, PrefillDecodingState):
      raise ValueError(f"PrefillDecodingPolicy.compact needs a cache built by its init (state is "
                       f"{type(state).__name__}, expected PrefillDecodingState)")
    if capacity is not None:
      cache = self.prefill.compact(cache.replace(state=state.prefill), capacity)
      state = state.replace(prefill=cache.state)
    out = self.decoding.compact(cache.replace(state=state.decoding), capacity)
    return out.replace(state=state.replace(decoding=out.state))
