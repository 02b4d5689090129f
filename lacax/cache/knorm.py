"""Knorm (arXiv 2406.11430): keep the keys of smallest L2 norm.

Reference NVIDIA/kvpress `presses/knorm_press.py::KnormPress.score`: score = -||k||_2 per KV head, in float32.
The norm is invariant under RoPE, so lacax scores its pre-RoPE cached keys directly and keeps exactly the
tokens kvpress keeps (ties aside: lacax breaks them toward the older token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache


def score_heads(keys: jax.Array) -> jax.Array:
  """keys [..., S, D] -> [..., S] float32: -||k||_2 (kvpress's KnormPress.score for keys [B, KV, S, D])."""
  return -jnp.linalg.norm(keys.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class KnormPolicy(ScorerPolicy):
  """Knorm: the `budget` lowest-norm keys of every (layer, row, KV head).

  Attributes:
    budget: tokens kept per (layer, row, KV head) (kvpress: int(k_len * (1 - compression_ratio))).
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default, kept keys keep their positions as in kvpress), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("Knorm")

  def score(self, cache: KVCache) -> jax.Array:
    return score_heads(cache.float_keys())  # [L, B, S, KV, D] -> [L, B, S, KV]: the norm needs no head-major layout
