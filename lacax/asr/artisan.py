"""Artisan layers (Master-ASR, Yu et al. ICML 2023, arXiv 2306.15686, Sec. 3.3-3.4) and S3-Router masks.

An Artisan layer keeps a pretrained kernel W [din, dout] and adds K specialist score tensors M [K, din, dout]
and, per language l, a selection row T[l] [K]:

  g_l = 1[sigmoid(T[l]) > 0.5]                 (Eq. 1: hard, deterministic choice; T > 0 <=> sigmoid > 0.5)
  S_l = sum_k g_l[k] M_k
  B_l = top-(1 - t) mask of S_l                 (Eq. 2: exactly ceil((1 - t) * din * dout) ones)
  W_l = W * B_l                                 (Eq. 3)

Definitions the paper leaves open, fixed here:
  * Ties: the mask keeps exactly `keep_count` entries; among equal scores the lower flat index wins
    (`lax.top_k` order, computed by a radix select: `topk_mask`). So the count is exact, never "one more" or
    "one fewer".
  * Empty selection (no T[l, k] > 0): the single specialist argmax_k T[l, k] is selected, so S_l is never the
    all-zero tensor and the mask stays a real top-(1 - t) choice.
  * Gradients (straight-through, as in S3-Router, Fu et al. NeurIPS 2022, GATECH-EIC/S3-Router
    `operation_st.py`): dB/dS = identity and dg/dT = sigmoid'(T).
S3-Router per-language masks are the special case K = number of languages with the fixed selection
g_l = one_hot(l) (no sharing).

Initialisation (`init_scores`): M_k = |W| * exp(noise * N(0, 1)), independently per k. With noise = 0 every
subset sum ranks entries like |W| and the mask ignores the selection (the collapse measured at toy scale);
noise ~ 1 keeps single-specialist masks distinct (Jaccard well below 1; tested).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION = ("q", "k", "v", "o")
FFN = ("fc1", "fc2")
KINDS = ("none", "artisan", "s3router")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """Which projections carry masks, and how.

  Attributes:
    kind: "none" (dense), "artisan" (Master-ASR: K shared specialists, per-language selection rows) or
      "s3router" (one score tensor per language, no sharing).
    targets: per-layer projections that are masked: a subset of q, k, v, o, fc1, fc2.
    num_specialists: K (artisan only; s3router uses K = num_languages).
    num_languages: rows of the selection tables (artisan) / score tensors per layer (s3router).
    sparsity: t, the pruned fraction of every mask (0 <= t < 1).
    init_noise: the log-normal diversity noise of `init_scores`.
  """
  kind: str = "none"
  targets: tuple[str, ...] = ATTENTION
  num_specialists: int = 4
  num_languages: int = 1
  sparsity: float = 0.3
  init_noise: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"MaskConfig.kind={self.kind!r}: expected one of {KINDS}")
    bad = [t for t in self.targets if t not in ATTENTION + FFN]
    if bad or not self.targets:
      raise ValueError(f"MaskConfig.targets={self.targets}: expected a non-empty subset of {ATTENTION + FFN}")
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"MaskConfig.sparsity={self.sparsity}: expected 0 <= t < 1")
    if self.num_specialists < 1 or self.num_languages < 1:
      raise ValueError(f"MaskConfig: num_specialists={self.num_specialists} and "
                       f"num_languages={self.num_languages} must be >= 1")

  @property
  def scores_per_layer(self) -> int:
    return self.num_specialists if self.kind == "artisan" else self.num_languages


def keep_count(size: int, sparsity: float) -> int:
  """ceil((1 - t) * size), robust to float round-off (e.g. (1 - 0.3) * 10 = 7.000000000000001)."""
  return min(size, max(1, math.ceil(round((1.0 - sparsity) * size, 9))))


def kth_largest_key(key: jax.Array, keep: int) -> jax.Array:
  """The `keep`-th largest of uint32 keys (a radix select: 32 counting passes, bit by bit from the top)."""

  def bit(i, prefix):
    candidate = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(jnp.sum(key >= candidate) >= keep, candidate, prefix)

  return jax.lax.fori_loop(0, 32, bit, jnp.uint32(0))


def topk_mask(scores: jax.Array, keep: int) -> jax.Array:
  """Exact top-`keep` 0/1 mask of `scores` (any shape), straight-through: d mask / d scores = identity."""
  hard = topk_hard(scores, keep)
  return hard + scores - jax.lax.stop_gradient(scores)


def topk_hard(scores: jax.Array, keep: int) -> jax.Array:
  """The 0/1 top-`keep` mask of `scores` (no gradient).

  The same mask as `lax.top_k` (ties: the lower flat index), found by a radix select of the keep-th largest
  score and a cumulative count of its ties: `lax.top_k` of a large k sorts, which made it most of Master-ASR's
  training-step overhead on CPU (48 ms against 9 ms for 16 masks of 128 x 128). Scores compare as floats
  (-0.0 == 0.0); NaN scores are not supported.
  """
  flat = scores.reshape(-1).astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(flat == 0, 0.0, flat), jnp.uint32)
  key = jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))  # float order as unsigned order
  threshold = kth_largest_key(key, keep)
  greater, tied = key > threshold, key == threshold
  take = greater | (tied & (jnp.cumsum(tied) <= keep - jnp.sum(greater)))
  return take.astype(scores.dtype).reshape(scores.shape)


def selection_gates(row: jax.Array) -> jax.Array:
  """Hard specialist gates of one selection row [K] with the empty-selection fallback, straight-through."""
  prob = jax.nn.sigmoid(row)
  hard = (row > 0).astype(row.dtype)
  fallback = jax.nn.one_hot(jnp.argmax(row), row.shape[-1], dtype=row.dtype)
  hard = jnp.where(hard.sum() > 0, hard, fallback)
  return hard + prob - jax.lax.stop_gradient(prob)


def artisan_mask(scores: jax.Array, gates: jax.Array, sparsity: float) -> jax.Array:
  """scores: [K, din, dout]; gates: [K] -> mask [din, dout] (STE to scores and gates)."""
  summed = jnp.einsum("k...,k->...", scores, gates)
  return topk_mask(summed, keep_count(summed.size, sparsity))


def layer_gates(entry: dict, lang, cfg: MaskConfig) -> jax.Array:
  """Gates [layers, K] of language `lang` for one target's mask params (artisan: from its selection rows
  [layers, L, K]; s3router: one_hot(lang), the language's own score tensor)."""
  num_layers = entry["scores"].shape[0]
  if cfg.kind == "s3router":
    return jnp.broadcast_to(jax.nn.one_hot(lang, cfg.num_languages, dtype=entry["scores"].dtype),
                            (num_layers, cfg.num_languages))
  row = jnp.take(entry["select"], lang, axis=1)  # [layers, K]
  return jax.vmap(selection_gates)(row)


def masked_kernels(kernel: jax.Array, scores: jax.Array, gates: jax.Array, sparsity: float) -> jax.Array:
  """kernel: [layers, din, dout]; scores: [layers, K, din, dout]; gates: [layers, K] -> W * B per layer."""
  masks = jax.vmap(lambda s, g: artisan_mask(s, g, sparsity))(scores, gates)
  return kernel * masks


def init_scores(rng: jax.Array, kernel: jax.Array, num: int, noise: float) -> jax.Array:
  """kernel [layers, din, dout] -> scores [layers, num, din, dout] = |W| * exp(noise * N(0, 1))."""
  eps = jax.random.normal(rng, (kernel.shape[0], num) + kernel.shape[1:], kernel.dtype)
  return jnp.abs(kernel)[:, None] * jnp.exp(noise * eps)


def init_mask_params(rng: jax.Array, layers: dict, cfg: MaskConfig) -> dict:
  """Mask parameters for stacked layer params: {target: {"scores": [...], "select": [layers, L, K]}}."""
  if cfg.kind == "none":
    return {}
  out = {}
  keys = jax.random.split(rng, 2 * len(cfg.targets))
  for i, name in enumerate(cfg.targets):
    kernel = layers[name]["kernel"]
    entry = {"scores": init_scores(keys[2 * i], kernel, cfg.scores_per_layer, cfg.init_noise)}
    if cfg.kind == "artisan":
      entry["select"] = jax.random.normal(keys[2 * i + 1], (kernel.shape[0], cfg.num_languages,
                                                            cfg.num_specialists), kernel.dtype)
    out[name] = entry
  return out


def apply_masks(layers: dict, masks: dict, lang, cfg: MaskConfig) -> dict:
  """Stacked layer params with every target kernel replaced by its masked kernel for language `lang`."""
  if cfg.kind == "none":
    return layers
  out = dict(layers)
  for name in cfg.targets:
    kernel = layers[name]["kernel"]
    gates = layer_gates(masks[name], lang, cfg)
    out[name] = dict(layers[name], kernel=masked_kernels(kernel, masks[name]["scores"], gates, cfg.sparsity))
  return out


def selections(masks: dict, cfg: MaskConfig) -> np.ndarray:
  """Hard selections of every language: [targets, layers, L, K] bool (the language-to-specialist map)."""
  out = []
  for name in cfg.targets:
    sel = np.asarray(masks[name]["select"])
    hard = sel > 0
    empty = ~hard.any(axis=-1)
    arg = np.eye(sel.shape[-1], dtype=bool)[sel.argmax(axis=-1)]
    out.append(np.where(empty[..., None], arg, hard))
  return np.stack(out)
