"""LeverageScore (Chari & Van Durme, arXiv 2507.08143): keep the keys of largest approximate statistical leverage.

Reference NVIDIA/kvpress `presses/leverage_press.py::LeverageScorePress`, per (layer, row, KV head) over the
held tokens: centre the pre-RoPE keys over the sequence, sketch them on the right with a Gaussian matrix
Phi [D, k] / sqrt(k) (k = `sketch_dimension`, 48), X = centred @ Phi; the leverage of token i is
x_i^T (X^T X + jitter I)^-1 x_i (through a Cholesky factor, as kvpress, whose first attempt uses jitter
1e-2), clamped at 0;
the scores are then z-normalised.

Departures, both forced by determinism and batching: kvpress draws Phi with unseeded `torch.randn` per call
(lacax: `jax.random` from `seed`, one matrix per (layer, row, KV head); `score_heads` takes Phi explicitly so a
parity test can pass torch's); kvpress z-normalises over the whole (batch, heads, seq) tensor, lacax over the
(heads, seq) of each (layer, row) (the same at batch 1; a per-row affine map, so it changes no per-head
ranking, only how scores compare across heads for head-adaptive wrappers). kvpress retries the Cholesky with
a larger jitter on failure; lacax's fixed jitter 1e-2 on a Gram matrix of unit-scaled sketches is positive
definite. kvpress supports prefill only; `during_decode=True` rescores the held tokens at every step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache


def leverage(keys: jax.Array, valid: jax.Array, sketch: jax.Array, jitter: float = 1e-2) -> jax.Array:
  """keys [..., S, D] (pre-RoPE), valid [..., S], sketch [..., D, k] -> [..., S] float32 leverage >= 0
  (kvpress's `compute_leverage_scores` with its first-try jitter); empty slots score 0."""
  keys = keys.astype(jnp.float32)
  w = valid.astype(jnp.float32)[..., None]
  mean = jnp.sum(keys * w, axis=-2, keepdims=True) / jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)
  x = ((keys - mean) * w) @ sketch  # [..., S, k]
  gram = jnp.swapaxes(x, -1, -2) @ x
  gram = 0.5 * (gram + jnp.swapaxes(gram, -1, -2)) + jitter * jnp.eye(gram.shape[-1], dtype=jnp.float32)
  # x_i^T G^-1 x_i = ||L^-1 x_i||^2 for G = L L^T.
  z = forward_substitute(cholesky(gram), jnp.swapaxes(x, -1, -2))  # [..., k, S]
  return jnp.maximum(jnp.sum(z * z, axis=-2), 0.0)


def cholesky(a: jax.Array) -> jax.Array:
  """Lower Cholesky factor of SPD matrices a [..., k, k], column by column in plain jax.numpy.

  Not `jnp.linalg.cholesky`: on CPU that is a LAPACK custom call, which deadlocks XLA's multi-device CPU
  runtime inside a partitioned program (the 8-fake-device sharding test hung in it); k (the sketch size, 48)
  steps of vectorised arithmetic cost little and partition like any elementwise op.
  """
  k = a.shape[-1]
  idx = jnp.arange(k)

  def column(j, low):
    row = jnp.where(idx < j, jnp.take(low, j, axis=-2), 0.0)  # L[j, :j]
    diag = jnp.sqrt(jnp.maximum(jnp.take(jnp.take(a, j, axis=-1), j, axis=-1) - jnp.sum(row * row, -1), 1e-30))
    col = (jnp.take(a, j, axis=-1) - jnp.einsum("...ik,...k->...i", low, row)) / diag[..., None]
    col = jnp.where(idx > j, col, jnp.where(idx == j, diag[..., None], 0.0))
    return jnp.where(idx == j, col[..., :, None], low)

  return jax.lax.fori_loop(0, k, column, jnp.zeros_like(a))


def forward_substitute(low: jax.Array, b: jax.Array) -> jax.Array:
  """z = L^-1 b for lower-triangular L [..., k, k] and b [..., k, S], row by row in plain jax.numpy."""
  k = low.shape[-1]
  idx = jnp.arange(k)

  def row(j, z):
    l_row = jnp.where(idx < j, jnp.take(low, j, axis=-2), 0.0)  # [..., k]
    value = (jnp.take(b, j, axis=-2) - jnp.einsum("...k,...ks->...s", l_row, z)) / jnp.take(
        jnp.take(low, j, axis=-2), j, axis=-1)[..., None]
    return jnp.where((idx == j)[:, None], value[..., None, :], z)

  return jax.lax.fori_loop(0, k, row, jnp.zeros_like(b))


def zscore(scores: jax.Array, valid: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """(scores - mean) / max(std, 1e-6) over the valid entries of `axes` (torch's unbiased std)."""
  w = valid.astype(jnp.float32)
  count = jnp.sum(w, axis=axes, keepdims=True)
  mean = jnp.sum(scores * w, axis=axes, keepdims=True) / jnp.maximum(count, 1.0)
  var = jnp.sum(((scores - mean) * w) ** 2, axis=axes, keepdims=True) / jnp.maximum(count - 1.0, 1.0)
  return (scores - mean) / jnp.maximum(jnp.sqrt(var), 1e-6)


def gaussian_sketch(key: jax.Array, shape: tuple[int, ...], head_dim: int, sketch_dimension: int) -> jax.Array:
  """[*shape, head_dim, sketch_dimension] float32 N(0, 1) / sqrt(sketch_dimension) (kvpress's Phi)."""
  draw = jax.random.normal(key, shape + (head_dim, sketch_dimension), jnp.float32)
  return draw / math.sqrt(sketch_dimension)


def score_heads(keys: jax.Array, valid: jax.Array, sketch: jax.Array) -> jax.Array:
  """keys [B, KV, S, D] pre-RoPE, valid [B, KV, S], sketch [B, KV, D, k] -> [B, KV, S] z-scored leverage
  (normalised over the heads and slots of each row; any leading axes before B are kept apart too)."""
  return zscore(leverage(keys, valid, sketch), valid, axes=(-2, -1))


@dataclasses.dataclass(frozen=True)
class LeverageScorePolicy(ScorerPolicy):
  """LeverageScore: the `budget` keys of every (layer, row, KV head) with the largest sketched leverage.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    sketch_dimension: columns k of the Gaussian sketch (48 in kvpress).
    seed: PRNG seed of the sketch.
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  sketch_dimension: int = 48
  seed: int = 0
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("LeverageScore")
    plans.check_int("LeverageScore", "sketch_dimension", self.sketch_dimension, 1)
    plans.check_int("LeverageScore", "seed", self.seed, 0)

  @property
  def name(self) -> str:
    return "leverage"

  def score(self, cache: KVCache) -> jax.Array:
    keys = plans.head_major(plans.scoring_keys(cache, "pre_rope", self.inv_freq(cache)))
    sketch = gaussian_sketch(jax.random.PRNGKey(self.seed), keys.shape[:3], keys.shape[-1], self.sketch_dimension)
    return plans.slot_major(score_heads(keys, plans.head_major(cache.valid()), sketch))
