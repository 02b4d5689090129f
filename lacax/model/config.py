"""Model configuration for the Llama-family decoder.

One frozen, hashable dataclass describes every architecture lacax runs (Llama 2, Llama 3/3.1/3.2, Mistral,
Qwen2, SmolLM2): the differences are fields (GQA head counts, RMSNorm eps, RoPE theta and scaling, tied
embeddings, qkv bias), never subclasses. Being hashable, a config can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

# Hugging Face `model_type` values whose decoder is the Llama block this module implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str | None, field: str) -> Any:
  """The jnp dtype a dtype name stands for, None for "" / None / "none"; a ValueError naming `field` otherwise.
  The one table of float dtype names lacax accepts (model, training and forward-option dtypes)."""
  if name in (None, "", "none"):
    return None
  if name not in DTYPES:
    raise ValueError(f"{field}={name!r} is unknown; expected one of {sorted(DTYPES)} or ''")
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `kind` is "llama3" (Llama 3.1/3.2) or "linear"."""

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("llama3", "linear"):
      raise ValueError(f"rope_scaling.kind={self.kind!r} is not supported; expected 'llama3' or 'linear'")
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder.

  Attributes:
    vocab_size: number of token ids.
    hidden_size: model width D.
    intermediate_size: MLP width F.
    num_layers: decoder layers, stacked on the leading axis of every layer parameter.
    num_heads: query heads H.
    num_kv_heads: key/value heads KV (GQA when KV < H); H must be a multiple of KV.
    head_dim: per-head width (default hidden_size // num_heads).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: optional `RopeScaling`.
    max_position_embeddings: the model's trained context (informational; caches may be larger).
    tie_word_embeddings: the LM head reuses the embedding matrix.
    attention_bias: q/k/v projections carry a bias (Qwen2).
    dtype: compute and parameter dtype name: "float32" or "bfloat16" (or "float16").
    name: a free-form label (e.g. the checkpoint name), used in results.
    layer_shapes: heterogeneous layers (a physically sliced subnet): a tuple of segments
      (num_layers, num_heads, num_kv_heads, intermediate_size), in depth order, whose layer counts sum to
      `num_layers`; `params["layers"]` is then a list with one stacked dict per segment. Every segment's sizes
      are at most the model-wide fields, which stay the widest (the KV cache keeps `num_kv_heads` heads per
      layer, width masks are [num_heads] / [intermediate_size]). None: every layer has the model-wide sizes.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  dtype: str = "float32"
  name: str = "llama"
  layer_shapes: tuple[tuple[int, int, int, int], ...] | None = None

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{field}={value!r} must be a positive integer")
    if self.head_dim == 0:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
            "set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be a positive even integer (RoPE pairs)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    if self.rms_norm_eps <= 0:
      raise ValueError(f"ModelConfig.rms_norm_eps={self.rms_norm_eps} must be > 0")
    if self.rope_theta <= 0:
      raise ValueError(f"ModelConfig.rope_theta={self.rope_theta} must be > 0")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.layer_shapes is not None:
      self._check_layer_shapes()

  def _check_layer_shapes(self):
    try:
      shapes = tuple(tuple(int(v) for v in seg) for seg in self.layer_shapes)
    except (TypeError, ValueError):
      shapes = None
    if not shapes or any(len(seg) != 4 for seg in shapes):
      raise ValueError(f"ModelConfig.layer_shapes={self.layer_shapes!r} must be a non-empty sequence of "
                       "(num_layers, num_heads, num_kv_heads, intermediate_size) segments")
    object.__setattr__(self, "layer_shapes", shapes)
    for i, (n, h, kv, f) in enumerate(shapes):
      if min(n, h, kv, f) <= 0 or h % kv:
        raise ValueError(f"ModelConfig.layer_shapes[{i}]={shapes[i]}: sizes must be positive and num_heads a "
                         "multiple of num_kv_heads")
      if h > self.num_heads or kv > self.num_kv_heads or f > self.intermediate_size:
        raise ValueError(f"ModelConfig.layer_shapes[{i}]={shapes[i]} exceeds the model-wide num_heads="
                         f"{self.num_heads}, num_kv_heads={self.num_kv_heads}, intermediate_size="
                         f"{self.intermediate_size}")
    if sum(seg[0] for seg in shapes) != self.num_layers:
      raise ValueError(f"ModelConfig.layer_shapes={shapes} holds {sum(seg[0] for seg in shapes)} layers; "
                       f"num_layers={self.num_layers}")

  @property
  def segments(self) -> tuple[tuple[int, int, int, int], ...]:
    """(num_layers, num_heads, num_kv_heads, intermediate_size) of each layer segment (one if homogeneous)."""
    if self.layer_shapes is not None:
      return self.layer_shapes
    return ((self.num_layers, self.num_heads, self.num_kv_heads, self.intermediate_size),)

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def group_size(self) -> int:
    """Query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    """A copy with `changes`; unknown field names raise a ValueError naming them."""
    names = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(changes) - names)
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(names)}")
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (tied embeddings counted once)."""
    d, hd, v = self.hidden_size, self.head_dim, self.vocab_size
    total = v * d + d
    for n, h, kv, f in self.segments:
      per_layer = d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f + 2 * d
      if self.attention_bias:
        per_layer += hd * (h + 2 * kv)
      total += n * per_layer
    if not self.tie_word_embeddings:
      total += v * d
    return total

  def kv_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
    """Bytes of K and V one token occupies across all layers."""
    if dtype_bytes is None:
      dtype_bytes = jnp.dtype(self.jnp_dtype).itemsize
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _rope_scaling_from_hf(hf: Mapping[str, Any]) -> RopeScaling | None:
  # transformers 5 moved RoPE settings into `rope_parameters`; 4.x used `rope_scaling` (+ `rope_theta`).
  params = hf.get("rope_scaling") or hf.get("rope_parameters")
  if not params:
    return None
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return None
  if kind not in ("llama3", "linear"):
    raise ValueError(f"config.json rope_scaling.rope_type={kind!r} is not supported; expected 'llama3', 'linear' "
                     "or 'default'")
  return RopeScaling(
      kind=kind,
      factor=float(params["factor"]),
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
  )


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32", name: str | None = None) -> ModelConfig:
  """Builds a `ModelConfig` from a Hugging Face `config.json` dictionary.

  Raises:
    ValueError: naming the field when the architecture is unsupported or a required field is missing.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r} is not supported; expected one of "
                     f"{list(SUPPORTED_MODEL_TYPES)} (architectures={hf.get('architectures')})")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if key not in hf:
      raise ValueError(f"config.json is missing the field {key!r} (model_type={model_type!r})")
  # Mistral's `sliding_window` is not modelled: it only matters past `sliding_window` tokens (4096 and up), and
  # lacax's cache policies are the knob for long contexts.
  theta = hf.get("rope_theta")
  if theta is None:
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
  num_heads = int(hf["num_attention_heads"])
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or 0),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta),
      rope_scaling=_rope_scaling_from_hf(hf),
      max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
      dtype=dtype,
      name=name or hf.get("_name_or_path") or model_type,
  )


def load_hf_config(path: str, **kwargs) -> ModelConfig:
  """Reads `<path>/config.json` into a `ModelConfig`."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
  with open(config_path) as f:
    hf = json.load(f)
  kwargs.setdefault("name", os.path.basename(os.path.normpath(path)))
  return config_from_hf(hf, **kwargs)


# Shapes for well-known models, used by eval_shape tests and memory tables.
LLAMA3_8B = ModelConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, dtype="bfloat16", name="Llama-3-8B")

SMOLLM2_135M = ModelConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    name="SmolLM2-135M-Instruct")
