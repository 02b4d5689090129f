"""CUR / CurDKV (arXiv 2509.15038): keep the tokens of largest approximate key and value leverage.

Reference NVIDIA/kvpress `presses/cur_press.py::CURPress.score`, per KV head: k2 = ||k||^2 and v2 = ||v||^2 per
token (optionally after a random Gaussian projection G [D, 20] / sqrt(20)); with the local approximation
(default) each is normalised within consecutive windows of `local_window_size` slots (from slot 0, the last
window zero-padded); the score is k2, v2, (k2 + v2) / 2 or k2 * v2 (default), normalised over the sequence; the
first `num_sinks` tokens score 1.

Norms are invariant under RoPE, so lacax scores its pre-RoPE cached keys and keeps kvpress's tokens, except with
`use_random_leverage`, where kvpress projects post-RoPE keys with unseeded torch draws: lacax projects the keys
rotated at their original positions with a seeded `jax.random` matrix (the same tokens only in distribution).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache

LEVERAGE_TYPES = ("key", "value", "kv_avg", "kv_product")
_PROJECTION_RANK = 20  # kvpress's r


def _local_normalise(x: jax.Array, window: int) -> jax.Array:
  """x [..., S] divided by its sum over consecutive windows of `window` slots (last window zero-padded)."""
  num_slots = x.shape[-1]
  pad = (window - num_slots % window) % window
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(x.shape[:-1] + (-1, window))
  return (xp / jnp.sum(xp, axis=-1, keepdims=True)).reshape(x.shape[:-1] + (-1,))[..., :num_slots]


def score_heads(keys: jax.Array, values: jax.Array, valid: jax.Array | None = None, *, num_sinks: int = 4,
                leverage_type: str = "kv_product", use_local_approximation: bool = True,
                local_window_size: int = 16, projection: jax.Array | None = None) -> jax.Array:
  """keys, values [..., S, D], valid [..., S] (None = all) -> [..., S] float32 CUR scores.

  `projection` [D, r]: multiply keys and values by it first (kvpress's `use_random_leverage`).
  """
  keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)
  if projection is not None:
    keys, values = keys @ projection, values @ projection
  k2, v2 = jnp.sum(keys**2, axis=-1), jnp.sum(values**2, axis=-1)
  if valid is not None:  # empty slots weigh nothing, as kvpress's zero padding
    k2, v2 = jnp.where(valid, k2, 0.0), jnp.where(valid, v2, 0.0)
  if use_local_approximation:
    k2, v2 = _local_normalise(k2, local_window_size), _local_normalise(v2, local_window_size)
  scores = {"key": lambda: k2, "value": lambda: v2, "kv_avg": lambda: (k2 + v2) / 2,
            "kv_product": lambda: k2 * v2}[leverage_type]()
  if valid is not None:
    scores = jnp.where(valid, scores, 0.0)
  scores = scores / jnp.sum(scores, axis=-1, keepdims=True)
  slot = jnp.arange(scores.shape[-1])
  return jnp.where(slot < num_sinks, 1.0, scores)


@dataclasses.dataclass(frozen=True)
class CURPolicy(ScorerPolicy):
  """CUR: the `budget` tokens of every (layer, row, KV head) with the largest approximate leverage.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    num_sinks: leading tokens scored 1 (kept first; 4 in kvpress).
    leverage_type: "key", "value", "kv_avg" or "kv_product" (default, kvpress's).
    use_local_approximation: normalise the squared norms within windows (True, kvpress's default).
    local_window_size: that window (16).
    use_random_leverage: project keys and values with a seeded Gaussian [D, 20] matrix first (False).
    seed: the projection's PRNG seed.
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  num_sinks: int = 4
  leverage_type: str = "kv_product"
  use_local_approximation: bool = True
  local_window_size: int = 16
  use_random_leverage: bool = False
  seed: int = 0
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("CUR")
    plans.check_int("CUR", "num_sinks", self.num_sinks, 0)
    plans.check_int("CUR", "local_window_size", self.local_window_size, 1)
    plans.check_int("CUR", "seed", self.seed, 0)
    if self.leverage_type not in LEVERAGE_TYPES:
      raise ValueError(f"CUR leverage_type={self.leverage_type!r} must be one of {list(LEVERAGE_TYPES)}")

  @property
  def sink_tokens(self) -> int:
    return min(self.num_sinks, self.budget)  # they score above every other token; ties go to the older one

  def score(self, cache: KVCache) -> jax.Array:
    keys, projection = cache.float_keys(), None
    if self.use_random_leverage:
      keys = plans.scoring_keys(cache, "post_rope", self.inv_freq(cache))
      projection = jax.random.normal(jax.random.PRNGKey(self.seed), (keys.shape[-1], _PROJECTION_RANK),
                                     jnp.float32) / math.sqrt(_PROJECTION_RANK)
    values = plans.head_major(cache.float_values())
    scores = score_heads(plans.head_major(keys), values, plans.head_major(cache.valid()),
                         num_sinks=self.num_sinks, leverage_type=self.leverage_type,
                         use_local_approximation=self.use_local_approximation,
                         local_window_size=self.local_window_size, projection=projection)
    return plans.slot_major(scores)
