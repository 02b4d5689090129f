"""Scoring helpers shared by several cache methods (each method's module stays free of its siblings).

* Approximate statistical leverage of keys through a Gaussian sketch (kvpress `LeverageScorePress`): LeverageScore,
  CUR-style scorers and Compactor.
* Non-causal chunked attention of the held tokens' own recorded queries (kvpress `NonCausalAttnPress`), over
  the held sequence cut as a scorer with sinks sees it (`HeldSequence`): NonCausalAttn and Compactor.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.kv_cache import KVCache
from lacax.model import rope as rope_lib

_HI = jax.lax.Precision.HIGHEST


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


def chunked_column_sums(q: jax.Array, k: jax.Array, valid: jax.Array, chunk_size: int) -> jax.Array:
  """kvpress's `non_causal_chunked_attn`, averaged over the query heads of each KV head.

  Args:
    q: [..., G, N, D] rotated queries (G query heads per KV head), N a multiple of `chunk_size`.
    k: [..., N, D] rotated keys.
    valid: [..., N] the sequence's entries; the others are the reference's zero padding (their logits as it
      masks them: 0 for a padded query row, -1e-9 for a padded key column).
    chunk_size: tokens per chunk.

  Returns:
    [..., N] float32: each key's attention summed over its chunk's queries (padded rows included), mean over G.
  """
  *lead, g, n, d = q.shape
  chunks = n // chunk_size
  q = jnp.where(valid[..., None, :, None], q.astype(jnp.float32), 0.0).reshape(*lead, g, chunks, chunk_size, d)
  k = jnp.where(valid[..., :, None], k.astype(jnp.float32), 0.0).reshape(*lead, chunks, chunk_size, d)
  dots = jnp.einsum("...gcid,...cjd->...gcij", q, k, precision=_HI)
  ok = valid.reshape(*lead, 1, chunks, chunk_size)
  dots = jnp.where(ok[..., :, None], dots, 0.0)  # padded query rows: logits 0
  dots = jnp.where(ok[..., None, :], dots, -1e-9)  # padded key columns: -1e-9
  attn = jax.nn.softmax(dots, axis=-1)
  return jnp.mean(jnp.sum(attn, axis=-2).reshape(*lead, g, n), axis=-2)


def avg_pool3(x: jax.Array, valid: jax.Array) -> jax.Array:
  """`F.avg_pool1d(x, 3, padding=1, stride=1)` over the valid run of the last axis (zeros outside counted)."""
  x = jnp.where(valid, x, 0.0)
  pad = [(0, 0)] * (x.ndim - 1) + [(1, 1)]
  xp = jnp.pad(x, pad)
  return (xp[..., :-2] + xp[..., 1:-1] + xp[..., 2:]) / 3.0


@dataclasses.dataclass(frozen=True)
class HeldSequence:
  """The held tokens of every (layer, row, KV head) in slot order, cut as a scorer with sinks sees them.

  `order[..., i]` is the slot of the i-th held token (empty slots after the held ones), `n` the count; the
  scored part is i in [left, n - right), re-indexed from 0 and zero-padded to `grid` entries (a multiple of the
  chunk size). Arrays are head-major: [L, B, KV, ...].
  """

  order: jax.Array  # [L, B, KV, S] int32
  n: jax.Array  # [L, B, KV] int32
  left: int
  right: int
  grid: int

  @classmethod
  def of(cls, cache: KVCache, left: int, right: int, chunk_size: int) -> "HeldSequence":
    valid = plans.head_major(cache.valid())
    slot = jnp.arange(valid.shape[-1], dtype=jnp.int32)
    order = jnp.argsort(jnp.where(valid, slot, slot + valid.shape[-1]), axis=-1).astype(jnp.int32)
    n = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    grid = max(1, math.ceil(max(valid.shape[-1] - left, 1) / chunk_size)) * chunk_size
    return cls(order=order, n=n, left=left, right=right, grid=grid)

  def take(self, x: jax.Array) -> jax.Array:
    """x [L, B, KV, S, ...] (head-major) -> [L, B, KV, grid, ...]: the scored part in order, zero-padded."""
    idx = self.order.reshape(self.order.shape + (1,) * (x.ndim - 4))
    seq = jnp.take_along_axis(x, idx, axis=3)[:, :, :, self.left:]
    pad = self.grid - seq.shape[3]
    if pad > 0:
      seq = jnp.pad(seq, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (x.ndim - 4))
    return seq[:, :, :, :self.grid]

  @property
  def scored(self) -> jax.Array:
    """[L, B, KV, grid] bool: the entries of the scored part (i' < n - left - right)."""
    return jnp.arange(self.grid) < (self.n - self.left - self.right)[..., None]

  def to_slots(self, seq_scores: jax.Array, sink_score: float = jnp.inf) -> jax.Array:
    """[L, B, KV, grid] scores of the scored part -> [L, B, S, KV] per slot; the sinks (the first `left` and
    last `right` held tokens) at `sink_score`, empty slots at -inf."""
    s = self.order.shape[-1]
    i = jnp.arange(s)
    body = jnp.pad(seq_scores, [(0, 0)] * 3 + [(self.left, max(0, s - self.left - self.grid))])[..., :s]
    n = self.n[..., None]
    ranked = jnp.where(i < n, jnp.where((i < self.left) | (i >= n - self.right), sink_score, body), -jnp.inf)
    inverse = jnp.argsort(self.order, axis=-1)
    return plans.slot_major(jnp.take_along_axis(ranked, inverse, axis=-1))


def sequence_inputs(cache: KVCache, inv_freq: jax.Array, seq: HeldSequence):
  """(queries [L, B, KV, G, grid, D], keys [L, B, KV, grid, D], both rotated at their original positions,
  values [L, B, KV, grid, D]) of the scored part, float32."""
  if cache.stats is None or cache.stats.queries is None:
    raise ValueError("this cache records no queries: build it with the policy's init() (its stats_recording "
                     "asks the forward for StatsRecording(queries=True))")
  keys = plans.head_major(plans.scoring_keys(cache, "post_rope", inv_freq))
  pos = jnp.maximum(cache.pos, 0).astype(jnp.float32)
  angles = pos[..., None] * inv_freq  # [L, B, S, KV, D/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  cos, sin = jnp.concatenate([cos, cos], -1)[..., None, :], jnp.concatenate([sin, sin], -1)[..., None, :]
  queries = rope_lib.rotate(cache.stats.queries, cos, sin)  # [L, B, S, KV, G, D]
  values = cache.float_values()
  queries = jnp.moveaxis(seq.take(plans.head_major(queries)), 3, 4)  # [L, B, KV, G, grid, D]
  return queries, seq.take(keys), seq.take(plans.head_major(values))


def attention_scores(queries: jax.Array, keys: jax.Array, values: jax.Array, scored: jax.Array,
                     chunk_size: int) -> jax.Array:
  """[L, B, KV, grid] z-normalised pooled (chunked attention x value norm): kvpress `NonCausalAttnPress.score`
  on the scored part, one layer at a time (the chunk logits of all layers at once would be L times larger)."""

  def layer(args):
    q, k, v, ok = args
    a = chunked_column_sums(q, k, ok, chunk_size) * jnp.linalg.norm(v, axis=-1)
    return jnp.where(ok, avg_pool3(a, ok), 0.0)

  pooled = jax.lax.map(layer, (queries, keys, values, scored))
  return zscore(pooled, scored, axes=(-2, -1))
