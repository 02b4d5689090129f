"""LagKV (arXiv 2504.04704): score each partition of the sequence by its lag-relative spread against the next.

Reference NVIDIA/kvpress `presses/lagkv_press.py::LagKVPress.score`, reproduced step by step per (layer, row,
KV head) on the held tokens (a front-packed prefix of n slots):

  * n < n_sink + 2 lag_size: no compression by score: the sinks score 1 and token s >= n_sink scores
    (s - n_sink) / (n - n_sink), so a budget keeps the sinks and the most recent tokens;
  * otherwise the tokens [n_sink, end) with end = n_sink + ((n - n_sink) // lag) lag are cut into partitions of
    lag_size; partition j is scored against partition j + 1 (its "lag" reference): per channel, min-max
    normalise the tokens of j by the reference's min and max, take the standard deviation over channels
    (unbiased, as torch), softmax it over the partition, average the key and value scores and (without
    `cross_scoring`) turn them into ranks within the partition / lag_size; the sinks and the tail (the last
    full partition plus the remainder) score 1 and are kept first.

kvpress scores its post-RoPE cache keys; lacax rotates its pre-RoPE keys at their original positions
(`key_space="post_rope"`, default) to keep the same tokens. A reference partition whose channel is constant
divides by zero, in kvpress as here (NaN scores rank last).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache


def _lag_scores(states: jax.Array) -> jax.Array:
  """states [..., P, lag, D] -> [..., P - 1, lag]: kvpress's `_get_states_score` (partition j vs j + 1)."""
  ref, cur = states[..., 1:, :, :], states[..., :-1, :, :]
  lo = jnp.min(ref, axis=-2, keepdims=True)
  hi = jnp.max(ref, axis=-2, keepdims=True)
  spread = jnp.std((cur - lo) / (hi - lo), axis=-1, ddof=1)
  return jax.nn.softmax(spread, axis=-1)


def score_heads(keys: jax.Array, values: jax.Array, valid: jax.Array, *, n_sink: int = 4, lag_size: int = 128,
                cross_scoring: bool = False) -> jax.Array:
  """keys, values [..., S, D], valid [..., S] (a prefix of n slots) -> [..., S] float32 LagKV scores."""
  keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)
  num_slots = keys.shape[-2]
  n = jnp.sum(valid, axis=-1, dtype=jnp.int32)[..., None]  # [..., 1]
  slot = jnp.arange(num_slots, dtype=jnp.int32)
  ramp = (slot - n_sink).astype(jnp.float32) / jnp.maximum(n - n_sink, 1).astype(jnp.float32)
  short = jnp.where(slot < n_sink, 1.0, ramp)
  parts = (num_slots - n_sink) // lag_size if num_slots > n_sink else 0
  if parts < 2:  # no held sequence can reach n_sink + 2 lag_size
    return short
  body = slice(n_sink, n_sink + parts * lag_size)
  split = lambda x: x[..., body, :].reshape(x.shape[:-2] + (parts, lag_size, x.shape[-1]))  # noqa: E731
  score = (_lag_scores(split(keys)) + _lag_scores(split(values))) / 2  # [..., parts - 1, lag]
  if not cross_scoring:
    score = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1).astype(jnp.float32) / lag_size
  scored = jnp.ones(keys.shape[:-2] + (num_slots,), jnp.float32)
  scored = scored.at[..., n_sink:n_sink + (parts - 1) * lag_size].set(score.reshape(score.shape[:-2] + (-1,)))
  full_parts = (n - n_sink) // lag_size
  in_scored_part = (slot >= n_sink) & ((slot - n_sink) // lag_size < full_parts - 1)
  long = jnp.where(in_scored_part, scored, 1.0)
  return jnp.where(n >= n_sink + 2 * lag_size, long, short)


@dataclasses.dataclass(frozen=True)
class LagKVPolicy(ScorerPolicy):
  """LagKV: keep the `budget` best tokens by lag-relative scores (sinks and the recent tail first).

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    n_sink: leading tokens always scored 1 (4 in kvpress).
    lag_size: partition length (128 in kvpress).
    cross_scoring: keep the raw softmax scores instead of per-partition ranks (kvpress's experimental flag).
    key_space: "post_rope" (default, kvpress's keys) or "pre_rope".
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  n_sink: int = 4
  lag_size: int = 128
  cross_scoring: bool = False
  key_space: str = "post_rope"
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("LagKV")
    plans.check_int("LagKV", "n_sink", self.n_sink, 0)
    plans.check_int("LagKV", "lag_size", self.lag_size, 1)
    if self.key_space not in plans.KEY_SPACES:
      raise ValueError(f"LagKV key_space={self.key_space!r} must be one of {list(plans.KEY_SPACES)}")

  @property
  def sink_tokens(self) -> int:
    return min(self.n_sink, self.budget)  # they score above every other token; ties go to the older one

  def score(self, cache: KVCache) -> jax.Array:
    keys = plans.scoring_keys(cache, self.key_space, self.inv_freq(cache))
    values = plans.head_major(cache.float_values())
    scores = score_heads(plans.head_major(keys), values, plans.head_major(cache.valid()),
                         n_sink=self.n_sink, lag_size=self.lag_size, cross_scoring=self.cross_scoring)
    return plans.slot_major(scores)
