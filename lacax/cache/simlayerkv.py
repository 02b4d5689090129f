"""SimLayerKV (arXiv 2410.13846): "lazy" layers, whose last tokens attend the initial and recent tokens almost
only, keep just those; the other layers keep every token.

Reference NVIDIA/kvpress `presses/simlayerkv_press.py::SimLayerKVPress.compress` (prefill only). For a prompt of
k_len > n_initial + n_recent + n_last tokens, per layer:

  a = the attention of the last `n_last` queries (`SnapKVPress.compute_window_attention`, which drops the
      window's own keys: a covers keys [0, k_len - n_last)), averaged over the batch, the heads and the queries;
  lazy = a[:n_initial].sum() + a[-n_recent:].sum() > lazy_threshold, i.e. the mass on keys [0, n_initial) and
      [k_len - n_last - n_recent, k_len - n_last);
  a lazy layer keeps keys[:n_initial] and keys[-n_recent + n_last:], the last n_recent - n_last tokens (so a lazy
      layer holds n_initial + n_recent - n_last tokens); the others keep all.

lacax states the same per (layer, row): a batch of right-padded rows is decided row by row, as separate batch-1
runs (kvpress averages the decision over the batch). The attention is the forward's recorded statistic of the
prefill's last `n_last` queries ("last" / "window:n_last", group heads averaged, then averaged over the kv
heads: the mean over every query head for equal groups).

Memory. kvpress's per-layer cache lists let a lazy layer be shorter. lacax's cache is rectangular (every layer
has the same slot count), and some layer may be non-lazy, so the decode cache is sized for the whole prompt plus
the generated tokens (`run_capacity`), and a lazy layer's evicted slots stay empty: no memory is saved unless
the cache were ragged; the lazy layers' attention just reads fewer tokens. Use it to study the method's
effect, not its footprint.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy, RopeState, lean_decode_cache
from lacax.cache.kv_cache import KVCache
from lacax.model import rope as rope_lib
from lacax.model.config import ModelConfig


def lazy_layers(scores: jax.Array, valid: jax.Array, *, n_initial: int, n_recent: int, n_last: int,
                lazy_threshold: float) -> jax.Array:
  """[L, B] bool: the (layer, row) planes that are lazy.

  Args:
    scores: [L, B, S, KV] attention received from the last `n_last` queries, summed over them (group-averaged).
    valid: [L, B, S, KV] the slots holding a token (a prefilled prompt: slots [0, k_len) in time order).
  """
  first = valid & (jnp.cumsum(valid, axis=2) <= n_initial)
  window = plans.recent_mask(valid, n_last)
  recent = plans.recent_mask(valid, n_recent + n_last) & ~window
  mass = jnp.sum(jnp.where(first | recent, scores, 0.0), axis=2) / n_last  # [L, B, KV]
  k_len = jnp.max(jnp.sum(valid, axis=2), axis=-1)  # [L, B]: tokens held (the prompt's length at the hand-off)
  long_enough = k_len > n_initial + n_recent + n_last
  return long_enough & (jnp.mean(mass, axis=-1) > lazy_threshold) & (lazy_threshold < 1.0)


@dataclasses.dataclass(frozen=True)
class SimLayerKVPolicy(CachePolicy):
  """SimLayerKV: in the prefill hand-off, lazy layers keep their first `n_initial` and last
  `n_recent - n_last` tokens; the other layers keep all.

  Attributes:
    lazy_threshold: a layer is lazy when the last queries' mean attention mass on the initial and recent tokens
      exceeds it, in [0, 1]. 0.9 here, kvpress's recommended value for Llama 3 (0.65 Llama 2, 0.8 Mistral, 0.85
      Qwen); kvpress's default 1.0 disables the method.
    n_last: queries whose attention decides (1, kvpress; "to match SKLV-decode").
    n_recent: recent tokens in the lazy score (1024, kvpress); a lazy layer keeps n_recent - n_last of them.
    n_initial: initial (sink) tokens kept by lazy layers (4, kvpress).
    rope_mode: "original" (default, kvpress's positions), "slot" or "stored".
    lean_decode: the decode cache records nothing (`lean_decode_cache`; False inside a composition whose other
      policy still reads the scores).
  """

  lazy_threshold: float = 0.9
  n_last: int = 1
  n_recent: int = 1024
  n_initial: int = 4
  rope_mode: str = "original"
  lean_decode: bool = True

  score_agg = "mean"

  def __post_init__(self):
    plans.check_number("SimLayerKV", "lazy_threshold", self.lazy_threshold, 0, 1)
    plans.check_int("SimLayerKV", "n_last", self.n_last, 1)
    plans.check_int("SimLayerKV", "n_initial", self.n_initial, 0)
    plans.check_int("SimLayerKV", "n_recent", self.n_recent, 1)
    if self.n_recent <= self.n_last:
      raise ValueError(f"SimLayerKV n_recent={self.n_recent} must be > n_last={self.n_last} (lazy layers keep "
                       "the last n_recent - n_last tokens)")
    plans.check_rope_and_agg("SimLayerKV", self)

  @property
  def score_mode(self) -> str:
    return "last" if self.n_last == 1 else f"window:{self.n_last}"

  def init_state(self, cfg: ModelConfig) -> RopeState:
    return RopeState(inv_freq=jnp.asarray(rope_lib.inv_frequencies(cfg), jnp.float32))

  @property
  def sink_tokens(self) -> int:
    return self.n_initial

  @property
  def compacts_in_decode(self) -> bool:
    return False

  @property
  def lazy_size(self) -> int:
    """Tokens a lazy layer keeps."""
    return self.n_initial + self.n_recent - self.n_last

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return max_tokens  # a non-lazy layer keeps every token

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.full(cfg.num_layers, seen)

  def lazy(self, cache: KVCache) -> jax.Array:
    """[L, B] bool: the lazy (layer, row) planes of a prefilled cache."""
    plans.require_scores("SimLayerKV", cache, self.score_mode)
    return lazy_layers(cache.scores, cache.valid(), n_initial=self.n_initial, n_recent=self.n_recent,
                       n_last=self.n_last, lazy_threshold=self.lazy_threshold)

  def keep_mask(self, cache: KVCache) -> jax.Array:
    """[L, B, S, KV] bool: what the hand-off keeps."""
    valid = cache.valid()
    first = valid & (jnp.cumsum(valid, axis=2) <= self.n_initial)
    recent = plans.recent_mask(valid, self.n_recent - self.n_last)
    return jnp.where(self.lazy(cache)[:, :, None, None], first | recent, valid)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """Evicts the lazy layers' middle tokens in the prefill hand-off (the call given `capacity`); decode calls
    keep all. The decode cache records nothing (`lean_decode_cache`)."""
    if capacity is None:
      return cache
    plan = lambda c: plans.keep_mask_plan(self.keep_mask(c), capacity)  # noqa: E731
    out = plans.apply_plan(cache, plan, jnp.any(self.lazy(cache)), capacity)
    return lean_decode_cache(out) if self.lean_decode else out
