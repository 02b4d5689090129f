"""KeyDiff (arXiv 2504.15364): keep the keys least similar to the mean key direction.

Reference NVIDIA/kvpress `presses/keydiff_press.py::KeyDiffPress.score`: anchor = mean over the sequence of
the L2-normalised keys; score = -cos(k, anchor). kvpress scores the post-RoPE keys of its cache; lacax, which
caches keys before RoPE, rotates them at their original positions first (`key_space="post_rope"`, the
default) so that it keeps the same tokens; `key_space="pre_rope"` scores the unrotated keys instead.
The paper's block-wise iterative form is kvpress's BlockPress wrapper (lacax: the chunking wrappers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache


def score_heads(keys: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """keys [..., S, D], valid [..., S] (None = all) -> [..., S] float32 -cos(k, anchor).

  The anchor is the mean of the normalised keys over the valid slots (`F.normalize`, eps 1e-12); the cosine
  is torch's `F.cosine_similarity` (each norm clamped at 1e-8).
  """
  keys = keys.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(keys.shape[:-1], bool)
  norm = jnp.linalg.norm(keys, axis=-1, keepdims=True)
  unit = jnp.where(valid[..., None], keys / jnp.maximum(norm, 1e-12), 0.0)
  count = jnp.maximum(jnp.sum(valid, axis=-1, dtype=jnp.float32), 1.0)[..., None, None]
  anchor = jnp.sum(unit, axis=-2, keepdims=True) / count  # [..., 1, D]
  dot = jnp.sum(keys * anchor, axis=-1)
  anchor_norm = jnp.linalg.norm(anchor, axis=-1)
  return -dot / (jnp.maximum(norm[..., 0], 1e-8) * jnp.maximum(anchor_norm, 1e-8))


@dataclasses.dataclass(frozen=True)
class KeyDiffPolicy(ScorerPolicy):
  """KeyDiff: the `budget` keys of every (layer, row, KV head) least aligned with their mean direction.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    key_space: "post_rope" (default, kvpress's keys) or "pre_rope".
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  key_space: str = "post_rope"
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("KeyDiff")
    if self.key_space not in plans.KEY_SPACES:
      raise ValueError(f"KeyDiff key_space={self.key_space!r} must be one of {list(plans.KEY_SPACES)}")

  def score(self, cache: KVCache) -> jax.Array:
    keys = plans.scoring_keys(cache, self.key_space, self.inv_freq(cache))
    return plans.slot_major(score_heads(plans.head_major(keys), plans.head_major(cache.valid())))
