"""ThinK (arXiv 2407.21018): prune the key channels that matter least to the observation window's queries.

Reference NVIDIA/kvpress `presses/think_press.py::ThinKPress.compress` (reviewed there by ThinK's first author).
At the prefill, per (row, kv head), with the post-RoPE queries q of the last `window` prompt tokens and the
post-RoPE keys k of the whole prompt:

  score[c] = mean_{window, group heads} q[c]^2 * mean_{tokens} k[c]^2      (channel c of head_dim D)

and the int(D * key_channel_compression_ratio) channels of lowest score are set to 0 in every key of that head.
Values and the sequence length are untouched, and so are the keys of tokens generated afterwards.

Positions. The channels are those of the post-RoPE keys (rotate-half layout, as Hugging Face's). A pre-RoPE
cache ("slot", "original") cannot express them: zeroing post-RoPE channel c mixes pre-RoPE channels c and
c +- D / 2 at a position-dependent angle. So ThinK needs `rope_mode="stored"` (keys cached rotated, as kvpress
caches them), where zeroing is exact against the reference.

Memory. None is saved, in lacax as in kvpress: the pruned channels are zeroed in place, the key array keeps its
static head_dim. Saving it would need a packed key array of D - n_pruned channels per (layer, row, kv head) plus
the kept channel indices, with queries gathered to match at every step; the pruned set differs per (layer, row,
kv head) and lacax's cache has one static [..., head_dim] key layout shared by every layer, so the packing is
not done here (kvpress reports the nominal saving as `compression_ratio = key_channel_compression_ratio / 2`).
The effect of the method (attention with those channels removed) is reproduced exactly.

`budget`: lacax's registry compares every policy at one token budget and no policy compresses a prompt within
it; ThinK follows that convention when `budget` is set (a (layer, row, kv head) holding at most `budget` tokens
keeps every channel). `budget=None` (the default) prunes every prompt, as kvpress.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy, resize
from lacax.cache.kv_cache import KVCache, StatsRecording, strip_recordings
from lacax.model.config import ModelConfig


def channel_scores(window_q2: jax.Array, keys: jax.Array, valid: jax.Array) -> jax.Array:
  """ThinK's channel importance [..., D] float32.

  Args:
    window_q2: [..., D] mean squared post-RoPE window queries (over the window and the group's query heads).
    keys: [..., S, D] post-RoPE keys; valid [..., S] the slots that hold a token.
  """
  k2 = jnp.where(valid[..., None], jnp.square(keys.astype(jnp.float32)), 0.0)
  count = jnp.maximum(jnp.sum(valid, axis=-1, dtype=jnp.float32), 1.0)[..., None]
  return window_q2.astype(jnp.float32) * (jnp.sum(k2, axis=-2) / count)


def pruned_channels(scores: jax.Array, n_pruned: int) -> jax.Array:
  """[..., D] bool: the `n_pruned` channels of lowest score (ties: the lower channel index; torch's topk leaves
  ties unspecified)."""
  order = jnp.argsort(scores, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return rank < n_pruned


@dataclasses.dataclass(frozen=True)
class ThinKPolicy(CachePolicy):
  """ThinK: zero the lowest-scoring key channels of every (layer, row, kv head) at the prefill hand-off.

  Attributes:
    key_channel_compression_ratio: fraction of the head_dim channels pruned, in [0, 1) (0.5 here, one of the
      paper's settings; kvpress's default 0.0 prunes nothing).
    window: the observation window's queries (32, kvpress).
    budget: prune only (layer, row, kv head) planes holding more tokens (the registry sets its shared budget);
      None prunes every prompt (kvpress).
    rope_mode: "stored" only (see the module docstring).
    lean_decode: the decode cache after the hand-off records nothing (False inside a composition whose other
      policy still reads the recordings).
  """

  key_channel_compression_ratio: float = 0.5
  window: int = 32
  budget: int | None = None
  rope_mode: str = "stored"
  lean_decode: bool = True

  def __post_init__(self):
    plans.check_number("ThinK", "key_channel_compression_ratio", self.key_channel_compression_ratio, 0, 1,
                       high_open=True)
    plans.check_int("ThinK", "window", self.window, 1)
    if self.budget is not None:
      plans.check_int("ThinK", "budget", self.budget, 1)
    if self.rope_mode != "stored":
      raise ValueError(f"ThinK rope_mode={self.rope_mode!r} must be 'stored': it prunes channels of the post-RoPE "
                       "keys, which a pre-RoPE cache cannot represent")

  @property
  def name(self) -> str:
    return "think"

  @property
  def stats_recording(self) -> StatsRecording:
    return StatsRecording(window_q2=self.window)

  @property
  def compacts_in_decode(self) -> bool:
    return False

  @property
  def compacts_in_prefill(self) -> bool:
    return False  # it removes channels, never tokens

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return max_tokens

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.full(cfg.num_layers, seen)

  def pruned(self, cache: KVCache) -> jax.Array:
    """[L, B, KV, D] bool: the channels the hand-off zeroes in each (layer, row, kv head)."""
    if cache.stats is None or cache.stats.window_q2 is None:
      raise ValueError("ThinK needs a cache recording the window's queries (StatsRecording(window_q2=...)); build "
                       "the cache with the policy's init()")
    keys = cache.float_keys()  # "stored": already post-RoPE
    scores = channel_scores(cache.stats.window_q2, plans.head_major(keys), plans.head_major(cache.valid()))
    n_pruned = int(cache.k.shape[-1] * self.key_channel_compression_ratio)
    prune = pruned_channels(scores, n_pruned)
    if self.budget is not None:
      prune = prune & (plans.occupancy(cache) > self.budget)[..., None]
    return prune

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """Zeroes the pruned key channels in the prefill hand-off (the call given `capacity`); decode calls keep
    the cache (keys of generated tokens keep every channel, as in kvpress)."""
    if capacity is None:
      return cache
    prune = self.pruned(cache)[:, :, None]  # [L, B, 1, KV, D]
    k = jnp.where(prune & cache.valid()[..., None], jnp.zeros((), cache.k.dtype), cache.k)
    out = resize(cache.replace(k=k), capacity)
    return strip_recordings(out) if self.lean_decode else out
