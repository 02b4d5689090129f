"""DuoAttention (arXiv 2410.10819): retrieval heads keep the whole cache, streaming heads keep sinks + recent.

Reference NVIDIA/kvpress `presses/duo_attention_press.py::DuoAttentionPress` (prefill only):

  post_init_from_model: head_scores [L, KV] (higher = more of a retrieval head), n_pruned =
      round(L * KV * head_compression_ratio); the n_pruned lowest-scored (layer, kv head) pairs are streaming
      heads (`streaming_mask`, from `np.argsort(head_scores, axis=None)`);
  compress: in every streaming head the prompt keys [sink_size, k_len - recent_size) are masked (the first
      `sink_size` and the last `recent_size` kept); retrieval heads keep all; decode tokens are never evicted.

Head pattern. kvpress downloads the DuoAttention authors' trained patterns (sink 64/128, recent 256/1024 per
model) or computes them with `duo_attention_on_the_fly` (sink 128, recent 256) from BookSum samples it downloads.
lacax downloads nothing: the policy takes the pattern as a field, either `head_scores` (per (layer, kv head),
kvpress's rule picks the streaming heads) or `streaming_heads` (the boolean mask itself, kvpress's
`streaming_mask`). `calibrate(params, cfg, prompts)` is kvpress's on-the-fly scoring restated on token lists the
caller gives (any text; kvpress uses 50 BookSum chapters): per layer, the mean query and mean key of each text
(pre-RoPE) are repeated over `q_len` positions and rotated there, the last query's softmax over those keys is
cumulated, and a head's score is the mean of that cumulative curve, averaged over its query group and over the
texts. The scores are a deterministic function of the model and the texts; pass them as `head_scores`.

Where lacax differs:
* ties in `head_scores` go to the lower flat (layer, kv head) index (a stable sort); kvpress's `np.argsort`
  (quicksort) leaves them unspecified;
* kvpress masks the evicted keys with "fake keys" whose exp(q.k) underflows to 0 (`attention_patch.py`) and
  keeps them in memory; lacax drops them (the same attention, exactly 0 weight);
* the registry sizes the streaming heads to the shared budget: `cache.start_size` sinks (4, the StreamingLLM
  sinks every registry policy shares, not kvpress's 128) + `size - start_size` recent tokens, so a streaming head
  holds what StreamingLLM holds at the same budget.

Memory. kvpress saves no memory (the masked keys stay in the cache). lacax's cache is rectangular: one slot axis
per layer shared by its kv heads (and one slot count for all layers), so a layer with any retrieval head holds
the whole prompt, and the streaming heads' evicted slots stay empty. The decode cache is sized for the whole
prompt plus the generated tokens (`run_capacity`) unless every head of every layer streams; the streaming heads'
attention reads fewer tokens, but memory is saved only by a ragged/paged layout (or by grouping the streaming
heads into their own cache, which lacax does not do). Use it to study the method's effect, not its footprint.
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

_OWNER = "DuoAttention"


def _given(name: str, value) -> bool:
  """Whether a pattern field is set (a non-empty sequence); anything but a sequence is an error."""
  if not isinstance(value, (tuple, list, np.ndarray)):
    raise ValueError(f"{_OWNER} {name}={value!r} must be a [layers][kv_heads] nested tuple (or () for none)")
  return len(value) > 0


def _as_matrix(name: str, value, kind) -> np.ndarray:
  """A non-empty [L][KV] nested tuple as a 2-D array of `kind` (bool or float), or a clear error."""
  try:
    rows = [tuple(r) for r in value]
    arr = np.asarray(rows, dtype=object)
  except TypeError:
    arr = None
  if arr is None or arr.ndim != 2 or arr.size == 0:
    raise ValueError(f"{_OWNER} {name}={value!r} must be a non-empty [layers][kv_heads] nested tuple")
  if kind is bool:
    if not all(isinstance(x, (bool, np.bool_)) for x in arr.ravel()):
      raise ValueError(f"{_OWNER} {name} must hold True/False per (layer, kv head); got {value!r}")
    return arr.astype(bool)
  ok = all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
           for x in arr.ravel())
  out = arr.astype(np.float64) if ok else None
  if out is None or not np.all(np.isfinite(out)):
    raise ValueError(f"{_OWNER} {name} must hold finite numbers per (layer, kv head); got {value!r}")
  return out


def streaming_mask(head_scores, head_compression_ratio: float) -> np.ndarray:
  """[L, KV] bool: the round(L * KV * ratio) lowest-scored heads stream (kvpress `post_init_from_model`; ties:
  the lower flat index)."""
  scores = np.asarray(head_scores, np.float64)
  n_pruned = round(scores.size * head_compression_ratio)
  mask = np.zeros(scores.shape, bool)
  if n_pruned > 0:
    mask.flat[np.argsort(scores, axis=None, kind="stable")[:n_pruned]] = True
  return mask


def keep_mask(valid: jax.Array, streaming: jax.Array, sink_size: int, recent_size: int) -> jax.Array:
  """[L, B, S, KV] bool: every token of a retrieval head; the first `sink_size` and last `recent_size` tokens of a
  streaming head (kvpress masks keys [sink_size, k_len - recent_size)).

  Args:
    valid: [L, B, S, KV] slots holding a token (in time order).
    streaming: [L, KV] bool.
  """
  sinks = valid & (jnp.cumsum(valid, axis=2) <= sink_size)
  recent = plans.recent_mask(valid, recent_size)
  return jnp.where(streaming[:, None, None, :], sinks | recent, valid)


@dataclasses.dataclass(frozen=True)
class DuoAttentionPolicy(CachePolicy):
  """DuoAttention: in the prefill hand-off the streaming heads keep `sink_size` + `recent_size` tokens, the
  retrieval heads all; decode steps evict nothing.

  Attributes:
    head_scores: per (layer, kv head) retrieval score, a [layers][kv_heads] nested tuple (`calibrate`, or the
      DuoAttention authors' `full_attention_heads.tsv`, clipped to [0, 1] as kvpress does); with
      `head_compression_ratio` it selects the streaming heads. () = none given.
    head_compression_ratio: fraction of the heads that stream, in [0, 1] (0.0, kvpress's default: none).
    streaming_heads: the [layers][kv_heads] boolean mask itself (kvpress's `streaming_mask`); () = derived from
      `head_scores`. Give one of the two, not both.
    sink_size, recent_size: what a streaming head keeps (128 and 256, kvpress's on-the-fly values).
    rope_mode: "original" (default, kvpress's positions), "slot" or "stored".
    lean_decode: the decode cache holds the keys rotated once (`lean_decode_cache`).
  """

  head_scores: tuple = ()
  head_compression_ratio: float = 0.0
  streaming_heads: tuple = ()
  sink_size: int = 128
  recent_size: int = 256
  rope_mode: str = "original"
  lean_decode: bool = True

  def __post_init__(self):
    plans.check_number(_OWNER, "head_compression_ratio", self.head_compression_ratio, 0, 1)
    plans.check_int(_OWNER, "sink_size", self.sink_size, 0)
    plans.check_int(_OWNER, "recent_size", self.recent_size, 1)
    if self.rope_mode not in plans.ROPE_MODES:
      raise ValueError(f"{_OWNER} rope_mode={self.rope_mode!r} must be one of {list(plans.ROPE_MODES)}")
    if _given("streaming_heads", self.streaming_heads):
      if _given("head_scores", self.head_scores) or self.head_compression_ratio:
        raise ValueError(f"{_OWNER} streaming_heads is the mask itself: give it without head_scores and "
                         f"head_compression_ratio (got head_scores={self.head_scores!r}, head_compression_ratio="
                         f"{self.head_compression_ratio!r})")
      mask = _as_matrix("streaming_heads", self.streaming_heads, bool)
      object.__setattr__(self, "streaming_heads", tuple(tuple(bool(x) for x in row) for row in mask))
    elif _given("head_scores", self.head_scores):
      scores = _as_matrix("head_scores", self.head_scores, float)  # nested tuples: the policy stays hashable
      object.__setattr__(self, "head_scores", tuple(tuple(float(x) for x in row) for row in scores))
    elif self.head_compression_ratio > 0:
      raise ValueError(f"{_OWNER} head_compression_ratio={self.head_compression_ratio} needs head_scores (per "
                       "(layer, kv head), e.g. from lacax.cache.duo_attention.calibrate) or streaming_heads; "
                       "lacax never downloads the DuoAttention patterns")

  def mask(self, cfg_or_layers, num_kv_heads: int | None = None) -> np.ndarray:
    """[L, KV] bool streaming heads for a model of that shape (a ModelConfig, or the two counts).

    Raises:
      ValueError: the pattern was calibrated for another shape.
    """
    if isinstance(cfg_or_layers, ModelConfig):
      shape = (cfg_or_layers.num_layers, cfg_or_layers.num_kv_heads)
    else:
      shape = (int(cfg_or_layers), int(num_kv_heads))
    if self.streaming_heads != ():
      mask, field = _as_matrix("streaming_heads", self.streaming_heads, bool), "streaming_heads"
    elif self.head_scores != ():
      scores, field = _as_matrix("head_scores", self.head_scores, float), "head_scores"
      if scores.shape == shape:
        return streaming_mask(scores, self.head_compression_ratio)
      mask = scores
    else:
      return np.zeros(shape, bool)
    if mask.shape != shape:
      raise ValueError(f"{_OWNER} {field} is [{mask.shape[0]}][{mask.shape[1]}] but the model has "
                       f"{shape[0]} layers x {shape[1]} kv heads")
    return mask

  @property
  def streaming_size(self) -> int:
    return self.sink_size + self.recent_size

  def init_state(self, cfg: ModelConfig) -> RopeState:
    self.mask(cfg)  # a pattern of another shape fails here, before any forward
    return RopeState(inv_freq=jnp.asarray(rope_lib.inv_frequencies(cfg), jnp.float32))

  @property
  def sink_tokens(self) -> int:
    return self.sink_size

  @property
  def compacts_in_decode(self) -> bool:
    return False

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return max_tokens  # a retrieval head keeps every token

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    return int(np.max(self.max_held(cfg, prompt_tokens))) + new_tokens

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    all_stream = np.all(self.mask(cfg), axis=1)
    return np.where(all_stream, min(seen, self.streaming_size), seen)

  def keep_mask(self, cache: KVCache) -> jax.Array:
    """[L, B, S, KV] bool: what the hand-off keeps."""
    streaming = jnp.asarray(self.mask(cache.num_layers, cache.pos.shape[-1]))
    return keep_mask(cache.valid(), streaming, self.sink_size, self.recent_size)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """Evicts the streaming heads' middle tokens in the prefill hand-off (the call given `capacity`); decode
    calls keep all."""
    if capacity is None:
      return cache
    mask = self.mask(cache.num_layers, cache.pos.shape[-1])
    needed = bool(mask.any()) & jnp.any(plans.occupancy(cache) > self.streaming_size)
    plan = lambda c: plans.keep_mask_plan(self.keep_mask(c), capacity)  # noqa: E731
    out = plans.apply_plan(cache, plan, needed, capacity)
    return lean_decode_cache(out) if self.lean_decode else out


def head_scores_from_means(q_mean: np.ndarray, k_mean: np.ndarray, inv_freq: np.ndarray, q_len: int) -> np.ndarray:
  """kvpress's on-the-fly DuoAttention score of one text: q_mean [L, H, hd], k_mean [L, KV, hd] (pre-RoPE means
  over the text's tokens) -> [L, KV] float64.

  Both means are repeated at positions 0..q_len-1 and rotated; the last query's softmax over the q_len keys
  (scaled by 1/sqrt(hd)) is cumulated, a query head's score is the mean of that cumulative curve, a kv head's
  the mean over its group (kvpress `duo_attention_on_the_fly`).
  """
  L, H, hd = q_mean.shape
  KV = k_mean.shape[1]
  pos = np.arange(q_len, dtype=np.float64)
  angles = pos[:, None] * np.asarray(inv_freq, np.float64)[None, :]  # [q_len, hd/2]
  cos, sin = np.cos(angles), np.sin(angles)
  cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)

  def rot(x):  # x [..., hd] -> [..., q_len, hd], rotated at every position
    x = np.asarray(x, np.float64)[..., None, :]
    half = hd // 2
    flipped = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + flipped * sin

  q_last = rot(q_mean)[..., -1, :]  # [L, H, hd]
  k = np.repeat(rot(k_mean), H // KV, axis=1)  # [L, H, q_len, hd]
  logits = np.einsum("lhd,lhsd->lhs", q_last, k) / np.sqrt(hd)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  s = np.cumsum(w, axis=-1).mean(-1)  # [L, H]
  return s.reshape(L, KV, H // KV).mean(-1)


def calibrate(params, cfg: ModelConfig, prompts, *, q_len: int = 500) -> np.ndarray:
  """DuoAttention head scores [L, KV] float64 from calibration token lists `prompts` (kvpress's on-the-fly
  scoring, each prompt one text; the mean over the texts). Pass `tuple(map(tuple, scores))` as `head_scores`.

  Raises:
    ValueError: no non-empty prompt, or a segmented model.
  """
  from lacax.model import llama  # pylint: disable=g-import-not-at-top  (llama imports the cache package)

  prompts = [list(p) for p in prompts if len(p)]
  if not prompts:
    raise ValueError("DuoAttention calibration needs at least one non-empty token list")
  plans.check_int(_OWNER, "q_len", q_len, 1)
  if isinstance(params["layers"], (list, tuple)):
    raise ValueError("calibration needs a homogeneous model (params['layers'] is a list of segments)")
  layers = params["layers"]

  @jax.jit
  def means(tokens):
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    options = llama.ForwardOptions(hidden_layers=tuple(range(cfg.num_layers)), logits=False)
    hidden = llama.run(params, tokens, positions, None, cfg, options=options).hidden  # [L, 1, T, D]

    def layer(h, norm, wq, wk, bq, bk):
      x = llama.rms_norm(h, norm, cfg.rms_norm_eps)
      q = llama.project(x, wq, "btd,dhk->bthk").astype(jnp.float32) + bq
      k = llama.project(x, wk, "btd,dhk->bthk").astype(jnp.float32) + bk
      return q.mean(axis=(0, 1)), k.mean(axis=(0, 1))

    zero_q = jnp.zeros(layers["wq"].shape[:1] + layers["wq"].shape[-2:], jnp.float32)
    zero_k = jnp.zeros(layers["wk"].shape[:1] + layers["wk"].shape[-2:], jnp.float32)
    bq, bk = (layers["bq"], layers["bk"]) if cfg.attention_bias else (zero_q, zero_k)
    return jax.vmap(layer)(hidden, layers["attn_norm"], layers["wq"], layers["wk"], bq, bk)

  inv_freq = np.asarray(rope_lib.inv_frequencies(cfg))
  total = np.zeros((cfg.num_layers, cfg.num_kv_heads))
  for p in prompts:
    q_mean, k_mean = means(jnp.asarray([p], jnp.int32))
    total += head_scores_from_means(np.asarray(q_mean), np.asarray(k_mean), inv_freq, q_len) / len(prompts)
  return total
