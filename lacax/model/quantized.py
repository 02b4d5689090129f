"""Weight-only int8 projections through the forward's plug point (`lacax.model.llama.ProjectedWeight`).

`Int8Weight` stores a projection as int8 values with one float scale per output channel (symmetric, absmax /
127 over the contracted axes); `llama.project` dequantizes it into the product (XLA fuses the scale into the
dot's operand). It is the reference quantized-weight type of the plug point: packed int4, group-wise scales or
a Pallas int8 matmul (Edge-LLM) are further `ProjectedWeight` subclasses, and the one forward runs them all.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from lacax.model.llama import ProjectedWeight

# Contracted (input) axes of every layer projection in the stacked layout of lacax.model.llama (axis 0 = layer).
LAYER_INPUT_AXES = {"wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2), "w_gate": (1,), "w_up": (1,),
                    "w_down": (1,)}


@flax.struct.dataclass
class Int8Weight(ProjectedWeight):
  """int8 values [...] and float32 scales (the values' shape with the input axes of size 1)."""

  values: jax.Array
  scales: jax.Array

  @classmethod
  def quantize(cls, w: jax.Array, input_axes: Sequence[int]) -> "Int8Weight":
    """Symmetric per-output-channel quantization: scale = max |w| over `input_axes` / 127."""
    wf = w.astype(jnp.float32)
    scales = jnp.max(jnp.abs(wf), axis=tuple(input_axes), keepdims=True) / 127.0
    scales = jnp.where(scales > 0, scales, 1.0)
    values = jnp.clip(jnp.round(wf / scales), -127, 127).astype(jnp.int8)
    return cls(values=values, scales=scales)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  def dense(self, dtype=jnp.float32) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scales).astype(dtype)

  def project(self, x: jax.Array, equation: str, preferred_element_type=None) -> jax.Array:
    return jnp.einsum(equation, x, self.dense(x.dtype), preferred_element_type=preferred_element_type)


def quantize_layers(params: Any, targets: Sequence[str] = tuple(LAYER_INPUT_AXES)) -> Any:
  """`params` with the layer projections `targets` replaced by `Int8Weight`s (every segment)."""
  unknown = sorted(set(targets) - set(LAYER_INPUT_AXES))
  if unknown:
    raise ValueError(f"quantize_layers targets {unknown}; expected a subset of {sorted(LAYER_INPUT_AXES)}")

  def segment(seg):
    return {name: Int8Weight.quantize(w, LAYER_INPUT_AXES[name]) if name in targets else w
            for name, w in seg.items()}

  layers = params["layers"]
  layers = [segment(s) for s in layers] if isinstance(layers, (list, tuple)) else segment(layers)
  return {**params, "layers": layers}
