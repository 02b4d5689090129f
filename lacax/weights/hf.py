"""Hugging Face checkpoints: a directory with `config.json` and `*.safetensors` (single file or sharded index).

Tensors are read one at a time with `safetensors.safe_open` (numpy framework, bf16 via ml_dtypes), so peak host
memory is one stacked parameter, not the whole checkpoint twice. Every tensor is checked against the shape the
config implies; errors name the tensor, the shape found and the shape expected. A truncated or corrupt file, an
invalid config.json or index raise `lacax.errors.CheckpointError` / `DataError` naming the file.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import numpy as np

from lacax import io
from lacax.errors import CheckpointError
from lacax.model.config import ModelConfig, load_hf_config

__all__ = ["CheckpointError", "hf_tensor_map", "load_hf_checkpoint", "param_reader", "read_hf_config",
           "read_hf_params"]


def read_hf_config(path: str, *, dtype: str = "float32") -> ModelConfig:
  """`<path>/config.json` as a `ModelConfig`; invalid JSON raises `DataError` naming the file, line, column."""
  config_path = os.path.join(path, "config.json")
  if os.path.isfile(config_path):
    io.read_json(config_path, what="config.json")  # named error before the model config parses it
  return load_hf_config(path, dtype=dtype)


def _safe_open(file: str):
  """`safetensors.safe_open`, a truncated or corrupt file raising `CheckpointError` naming it."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  size = os.path.getsize(file)
  with open(file, "rb") as f:
    header = f.read(8)
    if len(header) < 8:
      raise CheckpointError(f"truncated safetensors file: {size} bytes, not even the 8-byte header length",
                            path=file)
    header_len = int.from_bytes(header, "little")
    if 8 + header_len > size:
      raise CheckpointError(f"truncated safetensors file: the header claims {header_len} bytes but the file has "
                            f"{size}", path=file)
    try:
      meta = json.loads(f.read(header_len))
      # The header lists every tensor's byte range: a file cut short ends before the last one.
      end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
      raise CheckpointError(f"corrupt safetensors header ({type(e).__name__}: {e})", path=file) from None
  if 8 + header_len + end > size:
    raise CheckpointError(f"truncated safetensors file: its tensors need {8 + header_len + end} bytes but the file "
                          f"has {size}", path=file)
  try:
    return safe_open(file, framework="np")
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own SafetensorError)
    raise CheckpointError(f"not a readable safetensors file ({type(e).__name__}: {e})", path=file) from None


def _safetensors_files(path: str) -> dict[str, str]:
  """Maps every tensor name to the safetensors file that holds it."""
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index_path):
    index = io.read_json(index_path, what="safetensors index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
      raise CheckpointError("the index has no 'weight_map' object", path=index_path)
    return {name: os.path.join(path, file) for name, file in index["weight_map"].items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files (and no model.safetensors.index.json) in {path!r}")
  names = {}
  for file in files:
    with _safe_open(os.path.join(path, file)) as f:
      for name in f.keys():
        names[name] = os.path.join(path, file)
  return names


class _TensorReader:
  """Reads named tensors lazily from a set of safetensors files."""

  def __init__(self, files: dict[str, str]):
    self._files = files
    self._open = {}

  def names(self) -> set[str]:
    return set(self._files)

  def get(self, name: str) -> np.ndarray:
    if name not in self._files:
      raise CheckpointError(f"checkpoint is missing the tensor {name!r}")
    file = self._files[name]
    if file not in self._open:
      if not os.path.isfile(file):
        raise CheckpointError(f"the index lists {os.path.basename(file)!r} for tensor {name!r}, which is missing",
                              path=os.path.dirname(file))
      self._open[file] = _safe_open(file)
    try:
      return self._open[file].get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"tensor {name!r} cannot be read ({type(e).__name__}: {e})", path=file) from None


def _check(name: str, array: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
  if tuple(array.shape) != tuple(expected):
    raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(expected)}")
  return array


def hf_tensor_map(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], str, tuple[int, ...], Callable]]:
  """(lacax path, HF name template, HF shape, HF -> lacax transform) for every parameter.

  Layer names contain `{i}`; their lacax arrays are stacked over layers.
  """
  D, H, KV, hd, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                        cfg.vocab_size)
  ident = lambda w: w
  proj_in = lambda heads: (lambda w: w.T.reshape(D, heads, hd))
  yield ("embed",), "model.embed_tokens.weight", (V, D), ident
  yield ("final_norm",), "model.norm.weight", (D,), ident
  if not cfg.tie_word_embeddings:
    yield ("lm_head",), "lm_head.weight", (V, D), ident
  pre = "model.layers.{i}."
  yield ("layers", "attn_norm"), pre + "input_layernorm.weight", (D,), ident
  yield ("layers", "wq"), pre + "self_attn.q_proj.weight", (H * hd, D), proj_in(H)
  yield ("layers", "wk"), pre + "self_attn.k_proj.weight", (KV * hd, D), proj_in(KV)
  yield ("layers", "wv"), pre + "self_attn.v_proj.weight", (KV * hd, D), proj_in(KV)
  yield ("layers", "wo"), pre + "self_attn.o_proj.weight", (D, H * hd), lambda w: w.T.reshape(H, hd, D)
  if cfg.attention_bias:
    yield ("layers", "bq"), pre + "self_attn.q_proj.bias", (H * hd,), lambda b: b.reshape(H, hd)
    yield ("layers", "bk"), pre + "self_attn.k_proj.bias", (KV * hd,), lambda b: b.reshape(KV, hd)
    yield ("layers", "bv"), pre + "self_attn.v_proj.bias", (KV * hd,), lambda b: b.reshape(KV, hd)
  yield ("layers", "mlp_norm"), pre + "post_attention_layernorm.weight", (D,), ident
  yield ("layers", "w_gate"), pre + "mlp.gate_proj.weight", (F, D), lambda w: w.T
  yield ("layers", "w_up"), pre + "mlp.up_proj.weight", (F, D), lambda w: w.T
  yield ("layers", "w_down"), pre + "mlp.down_proj.weight", (D, F), lambda w: w.T


def param_reader(path: str, cfg: ModelConfig) -> Callable[[tuple[str, ...], int | None], np.ndarray]:
  """A per-tensor reader: read(lacax path, layer) -> one layer of a stacked parameter (or, with layer None, a
  whole unstacked one) in lacax layout and the checkpoint's dtype. `lacax.sharding.load_params` uses it to load
  straight into shards; only the requested tensor is read.

  Raises (when called):
    CheckpointError: the tensor is missing or mis-shaped (the message names it).
  """
  reader = _TensorReader(_safetensors_files(path))
  entries = {dest: (template, shape, transform) for dest, template, shape, transform in hf_tensor_map(cfg)}

  def read(dest: tuple[str, ...], layer: int | None = None) -> np.ndarray:
    template, shape, transform = entries[tuple(dest)]
    name = template.format(i=layer) if "{i}" in template else template
    return transform(_check(name, reader.get(name), shape))

  return read


def read_hf_params(path: str, cfg: ModelConfig, *, dtype=np.float32) -> dict:
  """Reads a Hugging Face checkpoint directory into the lacax parameter layout (numpy arrays).

  Raises:
    CheckpointError: a tensor is missing or mis-shaped (the message names it).
  """
  read = param_reader(path, cfg)
  params: dict = {"layers": {}}
  for dest, template, _, _ in hf_tensor_map(cfg):
    if "{i}" in template:
      stacked = None
      for i in range(cfg.num_layers):
        w = read(dest, i).astype(dtype)
        if stacked is None:
          stacked = np.empty((cfg.num_layers,) + w.shape, dtype)
        stacked[i] = w
      value = stacked
    else:
      value = read(dest).astype(dtype)
    target = params
    for key in dest[:-1]:
      target = target[key]
    target[dest[-1]] = value
  return params


def load_hf_checkpoint(path: str, *, dtype: str = "float32") -> tuple[ModelConfig, dict]:
  """(config, numpy params) from a Hugging Face checkpoint directory."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  cfg = read_hf_config(path, dtype=dtype)
  return cfg, read_hf_params(path, cfg)
