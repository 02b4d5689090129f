"""NonCausalAttn (Chari & Van Durme, arXiv 2507.08143): keep the keys the prompt's own queries attend to most,
within non-causal chunks.

Reference NVIDIA/kvpress `presses/non_causal_attention_press.py::NonCausalAttnPress`, per (layer, row, KV head)
over the held tokens in order (the "sequence", the prompt at the prefill hand-off):

  1. the sequence is cut into chunks of `chunk_size`; in each chunk every query attends to every key of the
     chunk, before as well as after it (no causal mask), with logits q . k (post-RoPE, **not** divided by
     sqrt(head_dim), as the reference), softmax in float32;
  2. a key's attention is the sum over the chunk's queries, averaged over the query heads of its KV head;
  3. score = attention * ||v||_2, 1-D average-pooled (kernel 3, zero padding counted: `F.avg_pool1d(x, 3,
     padding=1)`), then z-normalised (unbiased std, clamped at 1e-6).

The reference's padding of the last chunk is reproduced: it pads the sequence with zero queries and keys to a
whole chunk, sets the padded query rows' logits to 0 and the padded key columns' to -1e-9 (not -inf). So the
real queries of a short last chunk also weigh `pad` zero-logit keys, and every padded query row spreads about
1/chunk_size of attention over the chunk's keys; lacax computes the same numbers (`chunked_column_sums`).

lacax reads the prompt's queries from the forward (`StatsRecording(queries=True)`, pre-RoPE, at each token's
slot; rotated here at the token's original position, as a Hugging Face cache holds them) and drops them at the
prefill hand-off. Differences: kvpress z-normalises over the whole (batch, heads, seq) tensor, lacax over the
(heads, seq) of each (layer, row) (the same at batch 1); kvpress is prefill-only (`during_decode=True` rescores
the held tokens with their recorded queries at every step, and then keeps recording).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache, StatsRecording, dequantize_kv
from lacax.cache.leverage import zscore
from lacax.model import rope as rope_lib

_HI = jax.lax.Precision.HIGHEST


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
  values = cache.v if not cache.quantized else dequantize_kv(cache.v, cache.v_scale, jnp.float32)
  queries = jnp.moveaxis(seq.take(plans.head_major(queries)), 3, 4)  # [L, B, KV, G, grid, D]
  return queries, seq.take(keys), seq.take(plans.head_major(values.astype(jnp.float32)))


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


@dataclasses.dataclass(frozen=True)
class NonCausalAttnPolicy(ScorerPolicy):
  """NonCausalAttn: the `budget` tokens of every (layer, row, KV head) most attended within non-causal chunks.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    chunk_size: tokens per non-causal chunk (256, kvpress).
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  chunk_size: int = 256
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("NonCausalAttn")
    plans.check_int("NonCausalAttn", "chunk_size", self.chunk_size, 1)

  @property
  def name(self) -> str:
    return "noncausal"

  @property
  def stats_recording(self) -> StatsRecording:
    return StatsRecording(queries=True)

  def score(self, cache: KVCache) -> jax.Array:
    seq = HeldSequence.of(cache, 0, 0, self.chunk_size)
    q, k, v = sequence_inputs(cache, self.inv_freq(cache), seq)
    return seq.to_slots(attention_scores(q, k, v, seq.scored, self.chunk_size))

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    out = super().compact(cache, capacity)
    if capacity is not None and not self.during_decode and out.stats is not None:
      out = out.replace(stats=None)  # the prompt's queries are read once, in the prefill hand-off
    return out
