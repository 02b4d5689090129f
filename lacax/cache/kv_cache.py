"""The KV cache: an explicit, static-capacity pytree that every cache policy transforms.

Layout (L = layers, B = batch, S = slots, KV = kv heads, D = head_dim):

  k, v:    [L, B, S, KV, D]  keys are stored *before* RoPE and rotated when read (see `rope_mode`; the opt-in
                             "stored" mode keeps them rotated instead).
  pos:     [L, B, S, KV]     int32 original token position held by each slot, -1 = empty.
  length:  [L, B]            int32 write cursor: the next token of (layer, row) is written at slot `length`.
  scores:  [L, B, S, KV]     float32 attention statistics per slot, only for score-based policies (else None).
  state:   the policy's own small pytree (e.g. the ladder cursor), or None.
  stats:   a `CacheStats` of per-layer statistics besides attention (`StatsRecording`: ||W_o v||_1 per slot,
           the observation window's squared queries, running query moments), only for policies that declare
           them (CriticalKV, ThinK, ExpectedAttention's online statistics; else None).
  k_scale, v_scale: [L, B, S, KV] float32 per-token (and kv-head) scales of an int8 cache (`init_cache(...,
           dtype=jnp.int8)`; else None): slot values are round(x / scale) with scale = max|x| / 127 over
           head_dim, written by the forward and dequantized when read (`quantize_kv` / `dequantize_kv`).
           Plans move them with their slots, so every policy runs on an int8 cache unchanged.

Every layer holds the same number of slots; what differs per layer (LaCache) or per KV head (H2O, SnapKV,
KVMerger) is *which* tokens they hold, hence `pos` carries layer and kv-head axes. Occupied slots of a
(layer, row) are [0, length); a policy that frees slots compacts the survivors to the front, so a slot
index is also the "shifted" position that StreamingLLM and LaCache rotate keys at.

Two static fields say how the cache is read and what the attention must record:

  rope_mode:  "slot"      keys rotated at their slot index and queries at their own slot (StreamingLLM /
                          LaCache position shift; identical to "original" while nothing was evicted);
              "original"  keys rotated at their original position, queries at theirs (H2O, SnapKV, kvpress).
              "stored"    opt-in departure from DESIGN.md's pre-RoPE rule, for policies that never re-position
                          a key (full cache, H2O / TOVA / SnapKV / PyramidKV): keys are rotated once at
                          their original position when written and stored rotated (as Hugging Face and the
                          H2O / SnapKV references cache them). Reads give the same attention as "original"
                          up to float rounding, without a rotation pass over the whole cache every step (on
                          a 2-core CPU that pass costs SmolLM2-135M ~20 ms/token at 4k slots). Keys in the
                          cache are then post-RoPE: a policy that merges or re-rotates keys cannot use it.
  score_mode: None        no attention statistics (content-agnostic policies never pay for them);
              "accumulate"  scores += attention received, summed over the step's queries (H2O);
              "last"      scores = attention received from the step's last query (TOVA);
              "window:W"  scores = attention received from the last W queries of the step (SnapKV);
              "window_by_position:W"  the same, each query's row weighted by its position (Finch's
                          normalisation by the number of keys before the query).
  score_agg:  how the query heads of a GQA group are reduced to their KV head: "mean", "max" or "sum".
  mesh_rules: the `lacax.sharding.MeshRules` the cache is laid out by (None = one device). The forward and
              `gather_slots` read it to keep the layout and to compact shard by shard along the slot axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from lacax.model.config import ModelConfig

ROPE_MODES = ("slot", "original", "stored")
# Modes whose cached keys are pre-RoPE (what position-shifting and key-merging policies need).
PRE_ROPE_MODES = ("slot", "original")
SCORE_AGGS = ("mean", "max", "sum")


@dataclasses.dataclass(frozen=True)
class ScoreRecording:
  """Which attention statistic the forward writes into `cache.scores` (parsed once from a `score_mode`).

  Attributes:
    kind: "accumulate" (scores += attention received from the step's real queries), "last" (scores = attention
      received from the step's last real query) or "window" (from its last `width` real queries).
    width: the window width (kind "window" only).
    agg: how the query heads of a GQA group are reduced to their kv head: "mean", "max" or "sum".
    by_position: each query's attention row is weighted by the query's position (kvpress FinchPress's
      `normalize_scores`: a query at prompt index t, which sees t + 1 keys, counts t times; kind "window" only).
  """

  kind: str
  width: int = 0
  agg: str = "mean"
  by_position: bool = False

  def __post_init__(self):
    if self.kind not in ("accumulate", "last", "window"):
      raise ValueError(f"ScoreRecording.kind={self.kind!r} is not supported; expected 'accumulate', 'last' or "
                       "'window'")
    if self.kind == "window" and self.width <= 0:
      raise ValueError(f"ScoreRecording.width={self.width} must be > 0 for kind='window'")
    if self.agg not in SCORE_AGGS:
      raise ValueError(f"score_agg={self.agg!r} is not supported; expected one of {SCORE_AGGS}")
    if self.by_position and self.kind != "window":
      raise ValueError(f"ScoreRecording.by_position is for kind='window' only, not {self.kind!r}")

  @classmethod
  def parse(cls, score_mode: str | None, agg: str = "mean") -> "ScoreRecording | None":
    """None, "accumulate", "last", "window:<W>" or "window_by_position:<W>" (the `score_mode` strings of the
    policies)."""
    if score_mode is None:
      return None
    if score_mode in ("accumulate", "last"):
      return cls(score_mode, agg=agg)
    for prefix, by_position in (("window:", False), ("window_by_position:", True)):
      if isinstance(score_mode, str) and score_mode.startswith(prefix):
        width = score_mode[len(prefix):]
        if width.isdigit() and int(width) > 0:
          return cls("window", int(width), agg, by_position)
    raise ValueError(f"score_mode={score_mode!r} is not supported; expected None, 'accumulate', 'last', "
                     "'window:<positive int>' or 'window_by_position:<positive int>'")

  def row_weights(self, positions: jax.Array) -> jax.Array:
    """[B, W] float32 weight of each of a window's query rows (positions, -1 = none): 1, or the position."""
    if self.by_position:
      return jnp.maximum(positions, 0).astype(jnp.float32) * (positions >= 0)
    return (positions >= 0).astype(jnp.float32)

  def query_weights(self, positions: jax.Array) -> jax.Array:
    """[B, T] float32 weight of each query of a step (positions [B, T], -1 = padding) in the statistic."""
    valid = positions >= 0
    if self.kind == "accumulate":
      return valid.astype(jnp.float32)
    n_valid = jnp.sum(valid, axis=1, keepdims=True)
    t = jnp.arange(positions.shape[1])[None, :]
    width = 1 if self.kind == "last" else self.width
    return self.row_weights(jnp.where(valid & (t >= n_valid - width), positions, -1))

  def reduce_heads(self, probs: jax.Array) -> jax.Array:
    """[B, KV, G, T, S] probabilities -> [B, KV, T, S], the query heads of each group reduced by `agg`."""
    return {"mean": jnp.mean, "max": jnp.max, "sum": jnp.sum}[self.agg](probs, axis=2)


@dataclasses.dataclass(frozen=True)
class StatsRecording:
  """Which per-layer statistics besides attention probabilities the forward writes into `cache.stats`.

  The second half of the recording extension point (`ScoreRecording` is the first): a policy declares what it
  reads (`CachePolicy.stats_recording`), its `init` builds a cache with a `CacheStats` of that recording, and
  the forward computes only what is asked (a cache without stats runs the forward of before, bit for bit).
  None of these needs the attention probabilities, so the CPU decode kernel still serves a recording cache.

  Attributes:
    value_norm: record ||W_o v||_1 of every written token per kv head (the L1 norm over the model width of each
      query head's output projection of the value, averaged over the heads of the group: kvpress's
      `CriticalKVPress.vwl1norm`), at the token's slot; it moves with its slot under every plan.
    window_q2: W > 0 records, per (layer, row, kv head), the mean over the step's last W real queries and over
      the group's query heads of the squared rotated queries (ThinK's query channel magnitude); replaced at
      every step, like the "window" attention score. 0 = off.
    query_moments: n >= 0 accumulates the count, sum and sum of outer products of the pre-RoPE queries of every
      query head over the tokens at positions >= n (ExpectedAttention's online statistics, kvpress's n_sink);
      running over every step, so a chunked prefill gives the one-shot prefill's numbers. None = off.
    queries: record every written token's pre-RoPE query (each query head, grouped by its kv head) at the
      token's slot; it moves with its slot, like the value norm (a scorer that attends with the prompt's own
      queries: NonCausalAttn, Compactor). H x D floats per token and layer: as much as a float32 KV cache
      times the group size / 2, so it is for prefill-time scorers that drop it at the hand-off.
  """

  value_norm: bool = False
  window_q2: int = 0
  query_moments: int | None = None
  queries: bool = False

  def __post_init__(self):
    for name in ("value_norm", "queries"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"StatsRecording.{name}={getattr(self, name)!r} must be True or False")
    if isinstance(self.window_q2, bool) or not isinstance(self.window_q2, int) or self.window_q2 < 0:
      raise ValueError(f"StatsRecording.window_q2={self.window_q2!r} must be an int >= 0 (0 = off)")
    q = self.query_moments
    if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 0):
      raise ValueError(f"StatsRecording.query_moments={q!r} must be None or an int >= 0 (the positions skipped)")

  @property
  def empty(self) -> bool:
    return not self.value_norm and not self.window_q2 and self.query_moments is None and not self.queries

  def merge(self, other: "StatsRecording | None") -> "StatsRecording":
    """The union of two recordings (a wrapper's and its inner policy's).

    Raises:
      ValueError: both ask for a window or for query moments with different parameters.
    """
    if other is None:
      return self
    clashes = {"window_q2": self.window_q2 and other.window_q2 and self.window_q2 != other.window_q2,
               "query_moments": None not in (self.query_moments, other.query_moments)
                                and self.query_moments != other.query_moments}
    for name, clash in clashes.items():
      if clash:
        raise ValueError(f"StatsRecording.{name}: two policies of one cache ask for {getattr(self, name)} and "
                         f"{getattr(other, name)}; use one value")
    return StatsRecording(value_norm=self.value_norm or other.value_norm,
                          window_q2=self.window_q2 or other.window_q2,
                          query_moments=self.query_moments if self.query_moments is not None else other.query_moments,
                          queries=self.queries or other.queries)


@flax.struct.dataclass
class CacheStats:
  """The statistics a `StatsRecording` asks for (None where it does not), L layers, B rows, S slots, KV kv heads,
  H query heads, D head_dim, all float32:

    value_norm [L, B, S, KV]   ||W_o v||_1 of the token in each slot (0 for empty slots);
    window_q2  [L, B, KV, D]   mean squared rotated query of the last step's window, per kv head;
    q_count    [L, B]          queries counted in the moments;
    q_sum      [L, B, H, D]    their sum (pre-RoPE);
    q_outer    [L, B, H, D, D] the sum of their outer products;
    queries    [L, B, S, KV, G, D] the pre-RoPE queries of the token in each slot, G = H / KV query heads per
               kv head (0 for empty slots).
  """

  recording: StatsRecording = flax.struct.field(pytree_node=False)
  value_norm: jax.Array | None = None
  window_q2: jax.Array | None = None
  q_count: jax.Array | None = None
  q_sum: jax.Array | None = None
  q_outer: jax.Array | None = None
  queries: jax.Array | None = None

  def query_mean_cov(self) -> tuple[jax.Array, jax.Array]:
    """(mean [L, B, H, D], covariance [L, B, H, D, D]) of the counted queries, the covariance normalised by
    the count (kvpress's online statistics divide by N, not N - 1)."""
    if self.q_sum is None:
      raise ValueError("these cache statistics hold no query moments (StatsRecording.query_moments is None)")
    n = jnp.maximum(self.q_count, 1.0)[:, :, None, None]
    mean = self.q_sum / n
    cov = self.q_outer / n[..., None] - mean[..., :, None] * mean[..., None, :]
    return mean, cov


def init_stats(cfg: ModelConfig, batch_size: int, capacity: int, recording: StatsRecording | None
               ) -> CacheStats | None:
  """Zeroed `CacheStats` for `recording` (None for no recording or an empty one)."""
  if recording is None or recording.empty:
    return None
  L, B, KV, H, D = cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
  moments = recording.query_moments is not None
  return CacheStats(recording=recording,
                    value_norm=zeros(L, B, capacity, KV) if recording.value_norm else None,
                    window_q2=zeros(L, B, KV, D) if recording.window_q2 else None,
                    q_count=zeros(L, B) if moments else None,
                    q_sum=zeros(L, B, H, D) if moments else None,
                    q_outer=zeros(L, B, H, D, D) if moments else None,
                    queries=zeros(L, B, capacity, KV, H // KV, D) if recording.queries else None)


def strip_recordings(cache: "KVCache") -> "KVCache":
  """The cache without its recordings (attention scores and `stats`): what a policy that read them in its
  prefill hand-off decodes with, so the forward records nothing afterwards (and may use the CPU decode
  kernel again)."""
  return cache.replace(scores=None, score_mode=None, stats=None)


def validate_score_mode(score_mode: str | None) -> None:
  ScoreRecording.parse(score_mode)


@flax.struct.dataclass
class KVCache:
  """Static-capacity KV cache pytree; see the module docstring for the layout."""

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  length: jax.Array
  scores: jax.Array | None = None
  state: Any = None
  rope_mode: str = flax.struct.field(pytree_node=False, default="slot")
  score_mode: str | None = flax.struct.field(pytree_node=False, default=None)
  score_agg: str = flax.struct.field(pytree_node=False, default="mean")
  mesh_rules: Any = flax.struct.field(pytree_node=False, default=None)
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None
  stats: CacheStats | None = None

  @property
  def quantized(self) -> bool:
    """Keys and values are stored as int8 with per-token scales."""
    return self.k_scale is not None

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  @property
  def num_layers(self) -> int:
    return self.k.shape[0]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  @property
  def recording(self) -> ScoreRecording | None:
    """The attention statistic this cache's policy consumes (`score_mode` / `score_agg`, parsed)."""
    return ScoreRecording.parse(self.score_mode, self.score_agg)

  def valid(self) -> jax.Array:
    """[L, B, S, KV] bool: the slot holds a token."""
    return self.pos >= 0

  def float_keys(self, dtype=jnp.float32) -> jax.Array:
    """[L, B, S, KV, D] keys as the forward reads them, in `dtype`: an int8 cache's codes times their
    scales (a policy that scores `k` directly would score the int8 codes, whose scale differs per token)."""
    return dequantize_kv(self.k, self.k_scale, dtype).astype(dtype)

  def float_values(self, dtype=jnp.float32) -> jax.Array:
    """[L, B, S, KV, D] values as the forward reads them, in `dtype` (see `float_keys`)."""
    return dequantize_kv(self.v, self.v_scale, dtype).astype(dtype)

  def nbytes(self) -> int:
    """Resident bytes of every array in the cache."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


def init_cache(cfg: ModelConfig, batch_size: int, capacity: int, *, dtype=None, rope_mode: str = "slot",
               score_mode: str | None = None, score_agg: str = "mean", state: Any = None,
               mesh_rules: Any = None, stats: StatsRecording | None = None) -> KVCache:
  """An empty cache of `capacity` slots per (layer, row).

  `dtype=jnp.int8` stores keys and values as int8 with per-token scales (`k_scale` / `v_scale`). `stats` (a
  `StatsRecording`) adds the zeroed statistics the forward then records.

  With `mesh_rules` (a `lacax.sharding.MeshRules`) the cache is created in the rules' layout, each device
  allocating only its blocks (outside jit; inside jit, `MeshRules.shard_cache` lays a cache out). Without it,
  the cache is built on the default device (or, inside jit, wherever the program puts it).
  """
  if capacity <= 0:
    raise ValueError(f"cache capacity={capacity} must be a positive number of slots")
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive")
  if rope_mode not in ROPE_MODES:
    raise ValueError(f"rope_mode={rope_mode!r} is not supported; expected one of {ROPE_MODES}")
  if score_agg not in SCORE_AGGS:
    raise ValueError(f"score_agg={score_agg!r} is not supported; expected one of {SCORE_AGGS}")
  validate_score_mode(score_mode)
  dtype = dtype or cfg.jnp_dtype
  shape = (cfg.num_layers, batch_size, capacity, cfg.num_kv_heads, cfg.head_dim)
  quantized = jnp.dtype(dtype) == jnp.int8
  if jnp.issubdtype(dtype, jnp.integer) and not quantized:
    raise ValueError(f"cache dtype={jnp.dtype(dtype).name} is not supported; expected a float dtype or int8")
  build = lambda: KVCache(  # noqa: E731
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      k_scale=jnp.zeros(shape[:-1], jnp.float32) if quantized else None,
      v_scale=jnp.zeros(shape[:-1], jnp.float32) if quantized else None,
      pos=jnp.full(shape[:-1], -1, jnp.int32),
      length=jnp.zeros(shape[:2], jnp.int32),
      scores=None if score_mode is None else jnp.zeros(shape[:-1], jnp.float32),
      state=state,
      rope_mode=rope_mode,
      score_mode=score_mode,
      score_agg=score_agg,
      stats=init_stats(cfg, batch_size, capacity, stats),
  )
  if mesh_rules is not None:
    return mesh_rules.create_cache(build)
  return build()


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(int8 values, float32 scales [...]) of keys or values x [..., head_dim]: symmetric per token and head,
  scale = max|x| / 127, values round(x / scale) in [-127, 127]; |x - q * scale| <= scale / 2."""
  xf = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
  q = jnp.round(xf / jnp.where(scale > 0, scale, 1.0)[..., None])
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize_kv(q: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
  """q * scale in `dtype` (an unquantized cache's array is returned as is)."""
  if scale is None:
    return q
  return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def write_slots(length: jax.Array, positions: jax.Array, capacity: int) -> jax.Array:
  """Slot each new token goes to: [B, T] int32 (= capacity, i.e. dropped, for padding).

  Args:
    length: [B] write cursor of one layer.
    positions: [B, T] original positions of the new tokens, -1 for padding. Real tokens come first in each
      row (right padding), so the t-th real token lands at slot length + t.
  """
  t = jnp.arange(positions.shape[1], dtype=jnp.int32)[None, :]
  slots = length[:, None] + t
  return jnp.where(positions >= 0, slots, capacity)


def gather_slots(cache: KVCache, src: jax.Array, *, impl: str = "auto") -> KVCache:
  """Applies a compaction plan: output slot m of (layer, row, kv head) takes source slot src[..., m, kv].

  Args:
    cache: the cache to compact.
    src: int32 [L, B, S_out, KV] (or broadcastable, e.g. [L, 1, S_out, 1] for a plan shared by the batch and
      the heads), -1 = leave the output slot empty. S_out may differ from the cache capacity.
    impl: "auto" (Pallas kernel on TPU/GPU, jax.numpy on CPU), "pallas" or "reference".

  Returns:
    A cache of S_out slots with k, v, pos, scores and the per-slot statistics gathered, and `length` set to the
    number of occupied output slots (plans keep occupied slots at the front; a head with fewer survivors has
    empty slots before the cursor, which the attention mask ignores).
  """
  from pallas_kernels import compaction  # pylint: disable=g-import-not-at-top

  num_layers, batch, _, kv_heads, _ = cache.k.shape
  # A plan shared by the heads stays [L, B, S_out, 1] for the kernel, which then moves whole [KV, D] rows.
  plan = jnp.broadcast_to(src, (num_layers, batch, src.shape[2], src.shape[3])).astype(jnp.int32)
  gather = lambda x, p: compaction.gather(x, p, impl=impl)  # noqa: E731
  if cache.mesh_rules is not None:  # on a mesh: each device compacts its own (layer, row, head) blocks
    gather = functools.partial(cache.mesh_rules.slot_local, gather)
  k = gather(cache.k, plan)
  v = gather(cache.v, plan)
  src = jnp.broadcast_to(plan, (num_layers, batch, src.shape[2], kv_heads))
  safe = jnp.maximum(src, 0)
  pos = jnp.where(src >= 0, jnp.take_along_axis(cache.pos, safe, axis=2), -1)
  scores = None
  if cache.scores is not None:
    scores = jnp.where(src >= 0, jnp.take_along_axis(cache.scores, safe, axis=2), 0.0)
  scales = {}
  if cache.quantized:  # per-token scales travel with their slots
    scales = {name: jnp.where(src >= 0, jnp.take_along_axis(getattr(cache, name), safe, axis=2), 0.0)
              for name in ("k_scale", "v_scale")}
  stats = cache.stats
  if stats is not None and stats.value_norm is not None:  # the per-slot statistics travel with their slots
    stats = stats.replace(value_norm=jnp.where(src >= 0, jnp.take_along_axis(stats.value_norm, safe, axis=2), 0.0))
  if stats is not None and stats.queries is not None:
    stats = stats.replace(queries=jnp.where((src >= 0)[..., None, None], jnp.take_along_axis(
        stats.queries, safe[..., None, None], axis=2), 0.0))
  length = jnp.max(jnp.sum(pos >= 0, axis=2), axis=-1).astype(jnp.int32)
  out = cache.replace(k=k, v=v, pos=pos, scores=scores, length=length, stats=stats, **scales)
  return out if cache.mesh_rules is None else cache.mesh_rules.constrain_cache(out)
