"""Width: FLAP-style structured shrinking of attention groups and FFN channels, nested across widths.

The AmoebaLLM reference (GATECH-EIC/AmoebaLLM `width_shrink/prune.py::prune_flap`) runs FLAP (An et al.,
AAAI 2024, "Fluctuation-based adaptive structured pruning", CASIA-IVA-Lab/FLAP) with the WIFV metric and the
"AL-AM" structure:

  * score of input channel j of `o_proj` / `down_proj` = (sample variance of that channel over the calibration
    tokens) x ||W[:, j]||^2 (the column of the output projection); attention channel scores are squared;
  * every layer's attention scores and FFN scores are standardised (z-scored) within the layer; a head's score
    is the mean of its channels;
  * all heads and FFN channels of all layers are ranked together; a head weighs (its parameters / one FFN
    channel's parameters) channel-equivalents (512/3 for 128-dim MHA heads); units are kept from the top until
    the kept weight reaches `width` x the total: per-layer head and channel counts come out non-uniform;
  * each removed unit's calibration-mean input times its output weights becomes a constant output bias of
    `o_proj` / `down_proj`: b = W_out^T (mu * (1 - mask)) (bias compensation).

lacax choices (each documented where it is made):
  * GQA-consistent units: the attention unit is a KV group (one key/value head and its G query heads), so a
    shrunk layer is still a regular GQA layer (what the sliced export needs); its score is the mean over the
    group's G x head_dim standardised channels and its weight is its parameter count over one FFN channel's.
    For MHA (G = 1) this is exactly the reference's per-head unit and 512/3 weight.
  * masks are keyed by the exact width values of the trained grid and come from one ranking, so they are nested;
    width 1.0 is no mask at all (the reference's threshold would drop the lowest unit even at ratio 1.0).
  * the kept prefix is the one whose cumulative weight is closest to the budget (`rule="closest"`, within half a
    unit of it); `rule="reference"` keeps only the units strictly above the threshold unit, as FLAP's code does
    (one unit fewer).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from lacax.subnets.depth import check_signature, model_signature


@dataclasses.dataclass
class ActivationStats:
  """Running first and second moments of the inputs of every layer's o_proj and down_proj (float64, host).

  Attributes:
    attn_sum, attn_sumsq: [L, H, hd] sums of the attention output (o_proj input) channels and their squares.
    ffn_sum, ffn_sumsq: [L, F] sums of silu(gate) * up (down_proj input) channels and their squares.
    count: tokens accumulated.
  """

  attn_sum: np.ndarray
  attn_sumsq: np.ndarray
  ffn_sum: np.ndarray
  ffn_sumsq: np.ndarray
  count: int = 0

  @classmethod
  def zeros(cls, cfg) -> "ActivationStats":
    L, H, hd, F = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    return cls(np.zeros((L, H, hd)), np.zeros((L, H, hd)), np.zeros((L, F)), np.zeros((L, F)), 0)

  def add(self, attn_in: np.ndarray, ffn_in: np.ndarray, valid: np.ndarray) -> None:
    """Accumulates one batch: attn_in [L, B, T, H, hd], ffn_in [L, B, T, F], valid [B, T] bool."""
    w = np.asarray(valid, np.float64)[None, :, :, None]
    a = np.asarray(attn_in, np.float64)
    f = np.asarray(ffn_in, np.float64)
    self.attn_sum += np.einsum("lbthk,lbt->lhk", a, w[..., 0])
    self.attn_sumsq += np.einsum("lbthk,lbt->lhk", a * a, w[..., 0])
    self.ffn_sum += np.einsum("lbtf,lbt->lf", f, w[..., 0])
    self.ffn_sumsq += np.einsum("lbtf,lbt->lf", f * f, w[..., 0])
    self.count += int(np.asarray(valid).sum())

  @property
  def attn_mean(self) -> np.ndarray:
    return self.attn_sum / max(self.count, 1)

  @property
  def ffn_mean(self) -> np.ndarray:
    return self.ffn_sum / max(self.count, 1)

  def _var(self, s, ss) -> np.ndarray:
    n = max(self.count, 2)
    return np.maximum(ss - s * s / n, 0.0) / (n - 1)  # unbiased, as FLAP's running fluctuation

  @property
  def attn_var(self) -> np.ndarray:
    return self._var(self.attn_sum, self.attn_sumsq)

  @property
  def ffn_var(self) -> np.ndarray:
    return self._var(self.ffn_sum, self.ffn_sumsq)


def group_param_count(cfg) -> int:
  """Parameters of one KV group of one layer: G query heads, one key and one value head, their o_proj rows."""
  G, hd, D = cfg.group_size, cfg.head_dim, cfg.hidden_size
  n = D * hd * (G + 2) + G * hd * D
  if cfg.attention_bias:
    n += hd * (G + 2)
  return n


def ffn_channel_param_count(cfg) -> int:
  """Parameters of one FFN channel: a row of gate and up and a column of down."""
  return 3 * cfg.hidden_size


def _standardise(x: np.ndarray) -> np.ndarray:
  """z-score along the last axis (unbiased std, as torch.std)."""
  mean = x.mean(axis=-1, keepdims=True)
  std = x.std(axis=-1, ddof=1, keepdims=True)
  return (x - mean) / np.maximum(std, 1e-30)


def flap_scores(stats: ActivationStats, wo: np.ndarray, w_down: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
  """Standardised WIFV importance of every KV group and FFN channel.

  Args:
    stats: activation statistics of the full model.
    wo: [L, H, hd, D] o_proj weights; w_down: [L, F, D] down_proj weights.
    cfg: the model config.

  Returns:
    group_score [L, KV] and ffn_score [L, F] (float64; larger = more important).
  """
  L, KV, G, hd = cfg.num_layers, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
  wo = np.asarray(wo, np.float64)
  w_down = np.asarray(w_down, np.float64)
  attn = (stats.attn_var * np.sum(wo * wo, axis=-1)) ** 2  # [L, H, hd]
  attn = _standardise(attn.reshape(L, -1)).reshape(L, KV, G * hd).mean(axis=-1)
  ffn = _standardise(stats.ffn_var * np.sum(w_down * w_down, axis=-1))
  return attn, ffn


def _key(width: float) -> str:
  return repr(float(width))


@dataclasses.dataclass(frozen=True)
class WidthMasks:
  """Nested width masks and compensation biases, keyed by the exact width values of the grid.

  Attributes:
    widths: the grid, largest first (1.0 included: no mask).
    group_mask: width -> [L, KV] bool, KV groups kept.
    ffn_mask: width -> [L, F] bool, FFN channels kept.
    attn_bias: width -> [L, D] float32 o_proj output bias compensating the removed groups.
    ffn_bias: width -> [L, D] float32 down_proj output bias compensating the removed channels.
    model: `model_signature` of the model the masks were computed for.
  """

  widths: tuple[float, ...]
  group_mask: Mapping[float, np.ndarray]
  ffn_mask: Mapping[float, np.ndarray]
  attn_bias: Mapping[float, np.ndarray]
  ffn_bias: Mapping[float, np.ndarray]
  model: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def check_width(self, width: float) -> float:
    """`width` as the grid's own float; a ValueError naming the grid when it is not one of its values."""
    for w in self.widths:
      if abs(float(width) - w) < 1e-9:
        return w
    raise ValueError(f"width={width!r} is not in the trained width grid {list(self.widths)}")

  def masks(self, width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(group_mask [L, KV], ffn_mask [L, F], attn_bias [L, D], ffn_bias [L, D]) of `width`."""
    w = self.check_width(width)
    return self.group_mask[w], self.ffn_mask[w], self.attn_bias[w], self.ffn_bias[w]

  def save(self, path: str) -> str:
    """One .npz (arrays + a JSON index entry; no pickle), written atomically."""
    arrays = {"index": np.array(json.dumps({"widths": list(self.widths), "model": dict(self.model)}))}
    for w in self.widths:
      k = _key(w)
      arrays[f"group_mask/{k}"] = self.group_mask[w]
      arrays[f"ffn_mask/{k}"] = self.ffn_mask[w]
      arrays[f"attn_bias/{k}"] = self.attn_bias[w]
      arrays[f"ffn_bias/{k}"] = self.ffn_bias[w]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(buf.getvalue())
    os.replace(tmp, path)
    return path


def load_width_masks(path: str, cfg=None) -> WidthMasks:
  """Reads masks written by `WidthMasks.save`; with `cfg`, refuses masks made for another model."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"width mask file {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      index = json.loads(str(z["index"]))
      widths = tuple(float(w) for w in index["widths"])
      get = lambda name: {w: z[f"{name}/{_key(w)}"] for w in widths}  # noqa: E731
      masks = WidthMasks(widths=widths, group_mask=get("group_mask"), ffn_mask=get("ffn_mask"),
                         attn_bias=get("attn_bias"), ffn_bias=get("ffn_bias"), model=index.get("model", {}))
  except (KeyError, ValueError, OSError) as e:
    raise ValueError(f"{path} is not a lacax width mask file ({type(e).__name__}: {e})") from None
  if cfg is not None:
    check_signature(masks.model, cfg, path)
    L, KV, F = cfg.num_layers, cfg.num_kv_heads, cfg.intermediate_size
    for w in widths:
      if masks.group_mask[w].shape != (L, KV) or masks.ffn_mask[w].shape != (L, F):
        raise ValueError(f"{path} was made for another model: width {w} masks have shapes "
                         f"{masks.group_mask[w].shape} and {masks.ffn_mask[w].shape}; the model needs "
                         f"{(L, KV)} and {(L, F)}")
  return masks


def flap_width_masks(stats: ActivationStats, wo: np.ndarray, w_down: np.ndarray, cfg, widths: Sequence[float],
                     *, rule: str = "closest") -> WidthMasks:
  """FLAP AL-AM masks for every width of the grid, from one global ranking (nested), with bias compensation.

  Args:
    stats: activation statistics of the full model on the calibration set.
    wo: [L, H, hd, D] o_proj weights; w_down: [L, F, D] down_proj weights (float).
    cfg: the model config.
    widths: the width grid, values in (0, 1]; the fraction of attention + FFN parameters of the whole stack kept.
    rule: "closest" (kept prefix closest to the budget) or "reference" (FLAP's strict threshold: one unit fewer).

  Returns:
    The `WidthMasks` (width 1.0 always present: no mask, zero biases).
  """
  if rule not in ("closest", "reference"):
    raise ValueError(f"rule={rule!r} must be 'closest' or 'reference'")
  widths = sorted({float(w) for w in widths} | {1.0}, reverse=True)
  for w in widths:
    if not 0.0 < w <= 1.0:
      raise ValueError(f"width={w} must be in (0, 1]")
  L, KV, G, hd, F, D = (cfg.num_layers, cfg.num_kv_heads, cfg.group_size, cfg.head_dim, cfg.intermediate_size,
                        cfg.hidden_size)
  group_score, ffn_score = flap_scores(stats, wo, w_down, cfg)
  scores = np.concatenate([group_score.reshape(-1), ffn_score.reshape(-1)])
  unit_weight = np.concatenate([np.full(L * KV, group_param_count(cfg) / ffn_channel_param_count(cfg)),
                                np.ones(L * F)])
  order = np.argsort(-scores, kind="stable")
  cumulative = np.cumsum(unit_weight[order])
  total = cumulative[-1]
  wo = np.asarray(wo, np.float64)
  w_down = np.asarray(w_down, np.float64)
  attn_mu, ffn_mu = stats.attn_mean, stats.ffn_mean
  out = {name: {} for name in ("group_mask", "ffn_mask", "attn_bias", "ffn_bias")}
  for w in widths:
    if w == 1.0:
      keep = np.ones(scores.size, bool)
    else:
      k = int(np.argmin(np.abs(cumulative - w * total)))
      n_keep = k + 1 if rule == "closest" else k
      keep = np.zeros(scores.size, bool)
      keep[order[:n_keep]] = True
    group_mask = keep[:L * KV].reshape(L, KV)
    ffn_mask = keep[L * KV:].reshape(L, F)
    head_off = ~np.repeat(group_mask, G, axis=1)  # [L, H]
    attn_bias = np.einsum("lhk,lhkd->ld", attn_mu * head_off[..., None], wo)
    ffn_bias = np.einsum("lf,lfd->ld", ffn_mu * ~ffn_mask, w_down)
    out["group_mask"][w] = group_mask
    out["ffn_mask"][w] = ffn_mask
    out["attn_bias"][w] = attn_bias.astype(np.float32)
    out["ffn_bias"][w] = ffn_bias.astype(np.float32)
  return WidthMasks(widths=tuple(widths), model=model_signature(cfg), **out)


def kept_fraction(group_mask: np.ndarray, ffn_mask: np.ndarray, cfg, layer_mask: Sequence[int] | None = None
                  ) -> float:
  """Fraction of the stack's attention + FFN parameters a (layer mask, width masks) subnet keeps."""
  lm = np.ones(cfg.num_layers, bool) if layer_mask is None else np.asarray(layer_mask, bool)
  kept = (group_mask[lm].sum() * group_param_count(cfg) + ffn_mask[lm].sum() * ffn_channel_param_count(cfg))
  total = cfg.num_layers * (cfg.num_kv_heads * group_param_count(cfg)
                            + cfg.intermediate_size * ffn_channel_param_count(cfg))
  return float(kept / total)
