"""Export: a subnet as a physically smaller static model with per-layer head and FFN sizes.

The reference never builds a smaller model (every subnet is emulated with masks). lacax slices one
(spec §1.3's recipe):
  1. keep the layers with `strategy[L - d][i] = 1`;
  2. in each kept layer keep the KV groups whose mask is on (their G query heads, one key and one value head)
     and the FFN channels whose mask is on;
  3. fold the shape's (deterministic) SMoL adapter into the base weights;
  4. slice wq/wk/wv (and their biases) by head, wo by its head rows, w_gate/w_up by channel, w_down by its rows;
  5. keep the compensation biases as the layers' `bo` / `b_down`.
Layers of equal sizes that follow each other form one stacked segment (`lacax.model.llama`'s heterogeneous
layers: a list of segments, each scanned with the one layer body). A layer whose mask keeps no KV group (or no
FFN channel) keeps one with zero output weights, which contributes exactly 0, so the forward stays regular.

Masked and sliced logits are equal up to float rounding: a masked head or channel contributes exactly 0 in the
masked model and is absent in the sliced one.

On disk: a lacax checkpoint (`lacax.weights.checkpoint.save_params`: orbax arrays, the model config with its
`layer_shapes`, a verified manifest, written atomically) with, inside it, `lacax_subnet.json` (the per-layer
sizes, the shape, the source model) and the source model's tokenizer (`tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`) when one is given. `lacax.weights.loader.load_model(<dir>)` loads it like any lacax
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from lacax import io as lacax_io
from lacax.errors import DataError
from lacax.model.config import ModelConfig
from lacax.weights import checkpoint
from lacax.subnets import smol as smol_lib
from lacax.subnets.shape import SubnetShape, SubnetSpace

SUBNET_FILE = "lacax_subnet.json"


@dataclasses.dataclass(frozen=True)
class LayerSizes:
  """Per-layer sizes of a sliced subnet: KV groups (kv heads) and FFN channels of every kept layer."""

  kv_heads: tuple[int, ...]
  ffn: tuple[int, ...]


def _segments(sizes: LayerSizes) -> list[tuple[int, int]]:
  """(start, stop) runs of consecutive kept layers with equal sizes."""
  runs, start = [], 0
  for i in range(1, len(sizes.kv_heads) + 1):
    if i == len(sizes.kv_heads) or (sizes.kv_heads[i], sizes.ffn[i]) != (sizes.kv_heads[start], sizes.ffn[start]):
      runs.append((start, i))
      start = i
  return runs


def slice_subnet(base_params: Mapping[str, Any], cfg: ModelConfig, space: SubnetSpace, shape: SubnetShape,
                 smol_params: Any = None, smol_cfg: smol_lib.SMoLConfig | None = None
                 ) -> tuple[dict, ModelConfig, LayerSizes]:
  """The sliced static model of `shape`: (params with a list of layer segments, its config, per-layer sizes)."""
  params = jax.tree.map(np.asarray, dict(base_params))
  if smol_params is not None:
    adapter = smol_lib.shape_adapter(smol_params, space.encoding(shape), smol_cfg)
    params = jax.tree.map(np.asarray, smol_lib.merge(params, adapter, smol_cfg.scale))
  group_mask, ffn_mask, attn_bias, ffn_bias = space.width.masks(shape.width)
  G, hd = cfg.group_size, cfg.head_dim
  layers = params["layers"]
  kept = [i for i, on in enumerate(shape.layer_mask) if on]
  per_layer, kv_sizes, ffn_sizes = [], [], []
  for i in kept:
    groups = np.flatnonzero(group_mask[i])
    zero_attn = groups.size == 0
    if zero_attn:
      groups = np.array([0])
    heads = (groups[:, None] * G + np.arange(G)[None]).reshape(-1)
    channels = np.flatnonzero(ffn_mask[i])
    zero_ffn = channels.size == 0
    if zero_ffn:
      channels = np.array([0])
    p = {"attn_norm": layers["attn_norm"][i], "mlp_norm": layers["mlp_norm"][i],
         "wq": layers["wq"][i][:, heads], "wk": layers["wk"][i][:, groups], "wv": layers["wv"][i][:, groups],
         "wo": layers["wo"][i][heads] * (0.0 if zero_attn else 1.0),
         "w_gate": layers["w_gate"][i][:, channels], "w_up": layers["w_up"][i][:, channels],
         "w_down": layers["w_down"][i][channels] * (0.0 if zero_ffn else 1.0),
         "bo": attn_bias[i].astype(layers["wo"].dtype), "b_down": ffn_bias[i].astype(layers["w_down"].dtype)}
    if cfg.attention_bias:
      p.update(bq=layers["bq"][i][heads], bk=layers["bk"][i][groups], bv=layers["bv"][i][groups])
    per_layer.append(p)
    kv_sizes.append(int(groups.size))
    ffn_sizes.append(int(channels.size))
  sizes = LayerSizes(tuple(kv_sizes), tuple(ffn_sizes))
  segments = [{k: np.stack([per_layer[j][k] for j in range(a, b)]) for k in per_layer[a]}
              for a, b in _segments(sizes)]
  out = {k: v for k, v in params.items() if k != "layers"}
  out["layers"] = segments
  sub_cfg = cfg.replace(num_layers=len(kept), name=f"{cfg.name}-{shape.label()}",
                        layer_shapes=tuple((b - a, sizes.kv_heads[a] * G, sizes.kv_heads[a], sizes.ffn[a])
                                           for a, b in _segments(sizes)))
  return out, sub_cfg, sizes


def sliced_param_count(params: Mapping[str, Any], cfg: ModelConfig) -> int:
  """Parameters of a (sliced or full) model, tied embeddings counted once."""
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return n


def save_subnet(directory: str, params: Mapping[str, Any], cfg: ModelConfig, sizes: LayerSizes, *,
                shape: SubnetShape | None = None, source: str = "", extra: Mapping[str, Any] | None = None,
                tokenizer: Any = None) -> str:
  """Writes a sliced subnet as a lacax checkpoint (atomic and verified, `checkpoint.save_params`) with its
  subnet metadata (`SUBNET_FILE`) and, when given, `tokenizer` (a `lacax.tokenizer.Tokenizer`) inside it.

  Raises:
    FileExistsError: `directory` exists.
    ValueError: `cfg.layer_shapes` does not describe `params["layers"]` or `sizes`.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f"subnet directory {directory!r} exists")
  want = tuple((b - a, sizes.kv_heads[a] * cfg.group_size, sizes.kv_heads[a], sizes.ffn[a])
               for a, b in _segments(sizes))
  if cfg.layer_shapes != want or len(params["layers"]) != len(want):
    raise ValueError(f"save_subnet: ModelConfig.layer_shapes={cfg.layer_shapes} but the per-layer sizes give "
                     f"{want} ({len(params['layers'])} parameter segments); use slice_subnet's config")
  meta = {"kv_heads": list(sizes.kv_heads), "ffn": list(sizes.ffn), "num_segments": len(params["layers"]),
          "source": source,
          "shape": None if shape is None else {"layer_mask": list(shape.layer_mask), "width": shape.width},
          **dict(extra or {})}

  def write_extra(staging):
    lacax_io.write_json(os.path.join(staging, SUBNET_FILE), meta)
    if tokenizer is not None:
      tokenizer.save_hf_dir(staging)

  host = jax.tree.map(np.asarray, dict(params))
  return checkpoint.save_params(directory, host, cfg, write_extra=write_extra)


def is_subnet_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, SUBNET_FILE))


def load_subnet(directory: str) -> tuple[ModelConfig, dict, dict[str, Any]]:
  """(config, params with layer segments, metadata) of a subnet written by `save_subnet`."""
  meta_path = os.path.join(directory, SUBNET_FILE)
  if not os.path.isfile(meta_path):
    raise ValueError(f"{directory} is not a lacax subnet (no {SUBNET_FILE})")
  try:
    meta = lacax_io.read_json(meta_path, what="subnet metadata")
  except (DataError, json.JSONDecodeError) as e:
    raise ValueError(f"{directory} is not a readable lacax subnet ({type(e).__name__}: {e})") from None
  cfg = checkpoint.load_config(directory)
  params = checkpoint.restore_params(directory, cfg)
  n_layers = sum(int(s["attn_norm"].shape[0]) for s in params["layers"])
  if n_layers != cfg.num_layers or n_layers != len(meta.get("kv_heads", ())):
    raise ValueError(f"{directory}: the segments hold {n_layers} layers but the config says "
                     f"num_layers={cfg.num_layers} ({len(meta.get('kv_heads', ()))} per-layer sizes)")
  return cfg, params, meta
