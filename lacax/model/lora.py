"""LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) as their
own pytree beside the base weights, applied by the one forward (`lacax.model.llama.ForwardOptions.lora`).

For a target projection W (any of wq, wk, wv, wo, w_gate, w_up, w_down) the adapted layer computes
W x + scale * B(A(dropout(x))), scale = alpha / r, with A [in, r] (random: Kaiming-uniform as `peft` does)
and B [r, out] (zero, so a fresh adapter leaves the model unchanged). In lacax's stacked layout:

  lora[target] = {"a": [L, *in_axes, r], "b": [L, r, *out_axes]}
  wq/wk/wv: a [L, D, r], b [L, r, heads, hd];  wo: a [L, H, hd, r], b [L, r, D];
  w_gate/w_up: a [L, D, r], b [L, r, F];        w_down: a [L, F, r], b [L, r, D]

With heterogeneous layers (`params["layers"]` a list of segments) the LoRA pytree is a list of such dicts.

`merge` folds the adapters into the base weights for export (W + scale * A B) and `unmerge` takes them out
again; `param_labels` labels the combined {"params", "lora"} tree for optimizers that train only the adapters
(optax.multi_transform); `from_peft` reads the adapter weights of a Hugging Face `peft` LoRA model (reference:
huggingface/peft `src/peft/tuners/lora/layer.py`, `Linear.forward` / `get_delta_weight`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.model.config import ModelConfig

LoraParams = Any  # dict[target, {"a", "b"}], or a list of them (one per layer segment)

# Number of input (contracted) axes of each target's per-layer weight, in lacax's layout.
_NUM_IN_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
# Hugging Face module names of the targets.
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
            "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
LABEL_FROZEN, LABEL_ADAPTER = "frozen", "adapter"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters. Frozen and hashable: the static half of `ForwardOptions`.

  Attributes:
    rank: r, the adapter rank (> 0).
    alpha: the scale numerator: deltas are multiplied by alpha / r.
    dropout: dropout rate on the adapter input during training, in [0, 1).
    targets: projections that carry an adapter, a subset of wq, wk, wv, wo, w_gate, w_up, w_down.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("wq", "wv")

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoraConfig.rank={self.rank!r} must be a positive integer")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout={self.dropout} must be in [0, 1)")
    unknown = sorted(set(self.targets) - set(llama.LORA_TARGETS))
    if unknown or not self.targets:
      raise ValueError(f"LoraConfig.targets={self.targets} must be a non-empty subset of "
                       f"{sorted(llama.LORA_TARGETS)} (unknown: {unknown})")
    if len(set(self.targets)) != len(self.targets):
      raise ValueError(f"LoraConfig.targets={self.targets} repeats a projection")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _segments(tree: Any) -> list[Any]:
  return list(tree) if isinstance(tree, (list, tuple)) else [tree]


def _like(original: Any, segments: list[Any]) -> Any:
  return segments if isinstance(original, (list, tuple)) else segments[0]


def init_lora(lora_cfg: LoraConfig, params: llama.Params, key: jax.Array, dtype=jnp.float32) -> LoraParams:
  """A fresh adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming_uniform_(a=sqrt(5))), B = 0."""
  out = []
  for seg in llama.layer_segments(params):
    adapters = {}
    for name in lora_cfg.targets:
      shape = tuple(seg[name].shape)
      n_in = _NUM_IN_AXES[name]
      in_axes, out_axes = shape[1:1 + n_in], shape[1 + n_in:]
      bound = 1.0 / math.sqrt(math.prod(in_axes))
      key, sub = jax.random.split(key)
      adapters[name] = {
          "a": jax.random.uniform(sub, (shape[0], *in_axes, lora_cfg.rank), dtype, -bound, bound),
          "b": jnp.zeros((shape[0], lora_cfg.rank, *out_axes), dtype)}
    out.append(adapters)
  return _like(params["layers"], out)


def options(lora_cfg: LoraConfig, lora: LoraParams, rng: jax.Array | None = None,
            base: llama.ForwardOptions | None = None) -> llama.ForwardOptions:
  """`ForwardOptions` that apply `lora` (dropout only when `rng` is given, i.e. in training)."""
  return (base or llama.ForwardOptions()).replace(lora=lora, lora_config=lora_cfg, lora_rng=rng)


def delta(lora_cfg: LoraConfig, name: str, adapter: Mapping[str, jax.Array]) -> jax.Array:
  """scale * A B of one target, in the stacked base weight's shape [L, *in, *out] (float32)."""
  a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
  n_in = _NUM_IN_AXES[name]
  a2 = a.reshape(a.shape[0], -1, a.shape[-1])
  b2 = b.reshape(b.shape[0], b.shape[1], -1)
  d = jnp.einsum("lir,lro->lio", a2, b2) * lora_cfg.scale
  return d.reshape(a.shape[:1 + n_in] + b.shape[2:])


def _apply(params: llama.Params, lora: LoraParams, lora_cfg: LoraConfig, sign: float) -> llama.Params:
  segments = llama.layer_segments(params)
  lora_segments = _segments(lora)
  if len(lora_segments) != len(segments):
    raise ValueError(f"the LoRA pytree has {len(lora_segments)} segment(s); params have {len(segments)}")
  out = []
  for s, (seg, adapters) in enumerate(zip(segments, lora_segments)):
    seg = dict(seg)
    for name, adapter in adapters.items():
      w = seg[name]
      if isinstance(w, llama.ProjectedWeight):
        raise ValueError(f"cannot merge LoRA into layers[{s}].{name}: it is a {type(w).__name__}, not a dense "
                         "weight (merge before quantizing)")
      d = delta(lora_cfg, name, adapter)
      if d.shape != w.shape:
        raise ValueError(f"LoRA {name} of segment {s} gives a delta of shape {d.shape}; the weight is {w.shape}")
      seg[name] = (w.astype(jnp.float32) + sign * d).astype(w.dtype)
    out.append(seg)
  return {**params, "layers": _like(params["layers"], out)}


def merge(params: llama.Params, lora: LoraParams, lora_cfg: LoraConfig) -> llama.Params:
  """Base weights with the adapters folded in (W + scale * A B), for export: the plain forward of the result
  equals the forward with the adapters (up to float rounding)."""
  return _apply(params, lora, lora_cfg, 1.0)


def unmerge(merged: llama.Params, lora: LoraParams, lora_cfg: LoraConfig) -> llama.Params:
  """The base weights again from `merge`'s output (W - scale * A B; exact up to float rounding)."""
  return _apply(merged, lora, lora_cfg, -1.0)


def param_labels(params: llama.Params, lora: LoraParams, *, train_base: Sequence[str] = ()) -> dict[str, Any]:
  """Labels of the combined tree {"params": params, "lora": lora}: "adapter" for every LoRA weight, "frozen"
  for the base weights except the top-level / layer names in `train_base` (e.g. ("final_norm",)), which get
  "adapter" too. For `optax.multi_transform({"adapter": opt, "frozen": optax.set_to_zero()}, labels)`."""

  def base_label(path, _):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    return LABEL_ADAPTER if any(k in train_base for k in keys) else LABEL_FROZEN

  return {"params": jax.tree_util.tree_map_with_path(base_label, params),
          "lora": jax.tree.map(lambda _: LABEL_ADAPTER, lora)}


def from_peft(state_dict: Mapping[str, Any], cfg: ModelConfig, lora_cfg: LoraConfig) -> LoraParams:
  """The LoRA pytree of a `peft` LoRA model's weights (`model.state_dict()` or `get_peft_model_state_dict`).

  peft stores lora_A.weight [r, in] and lora_B.weight [out, r] per module, out / in flattened as Hugging
  Face's [out_features, in_features]; lacax's a / b are their transposes in the stacked layout.

  Raises:
    ValueError: a target's weight is missing for some layer, or has another shape (the message names it).
  """
  arrays = {}
  pattern = re.compile(r"layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
  for key, value in state_dict.items():
    m = pattern.search(key)
    if m:
      value = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
      arrays[(int(m.group(1)), m.group(2), m.group(3))] = value
  D, H, KV, hd, F, r = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                        lora_cfg.rank)
  out_shapes = {"wq": (H, hd), "wk": (KV, hd), "wv": (KV, hd), "wo": (D,), "w_gate": (F,), "w_up": (F,),
                "w_down": (D,)}
  in_shapes = {"wq": (D,), "wk": (D,), "wv": (D,), "wo": (H, hd), "w_gate": (D,), "w_up": (D,), "w_down": (F,)}
  lora = {}
  for name in lora_cfg.targets:
    a_layers, b_layers = [], []
    for layer in range(cfg.num_layers):
      for part in "AB":
        if (layer, HF_NAMES[name], part) not in arrays:
          raise ValueError(f"peft state dict has no layers.{layer}.{HF_NAMES[name]}.lora_{part}.weight (target "
                           f"{name!r} of LoraConfig.targets)")
      a, b = arrays[(layer, HF_NAMES[name], "A")], arrays[(layer, HF_NAMES[name], "B")]
      n_in, n_out = math.prod(in_shapes[name]), math.prod(out_shapes[name])
      if a.shape != (r, n_in) or b.shape != (n_out, r):
        raise ValueError(f"peft layers.{layer}.{HF_NAMES[name]}: lora_A {a.shape}, lora_B {b.shape}; expected "
                         f"({r}, {n_in}) and ({n_out}, {r}) for rank {r}")
      a_layers.append(a.T.reshape(*in_shapes[name], r))
      b_layers.append(b.T.reshape(r, *out_shapes[name]))
    lora[name] = {"a": jnp.asarray(np.stack(a_layers)), "b": jnp.asarray(np.stack(b_layers))}
  return lora
