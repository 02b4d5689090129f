"""Symmetric quantizers (Edge-LLM's, from LLM-QAT): per-channel and per-group weights, per-token activations,
fake quantization with a straight-through gradient.

Round to nearest with scale = max |x| / (2**(b-1) - 1) over each group, codes in [-(2**(b-1) - 1), 2**(b-1) - 1]:
at most 2**b - 1 distinct values per group, the group's max |x| reproduced exactly, error <= scale / 2, and
quantizing a quantized tensor again changes nothing. (The reference uses mean-|x| scales for 1/2-bit weights;
lacax keeps max-|x| at every width, so that the grid properties hold at 2 bits too.)

The straight-through estimator is the reference's: the gradient of fake_quant(x) is 1 where the *input* lies
strictly inside [-window, window] and 0 outside (`ste_window`, default 2.0, fixed whatever the scale; None = 1
everywhere). Scales get no gradient.

Weights are quantized as matrices [..., K, N] (K the contracted input features, N the outputs) with groups of
`group_size` consecutive input features per output (None = one group: per-channel), the layout of
`lacax.model.quantized.PackedWeight`; `fake_quant_weight` applies that to a lacax layer projection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BITS = (2, 3, 4, 8)  # the widths the policy search and the tests use; any integer in [2, 8] works
DEFAULT_STE_WINDOW = 2.0


def qmax(bits: int) -> int:
  """Largest code of a symmetric b-bit quantizer: 2**(b-1) - 1."""
  if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
    raise ValueError(f"bits={bits!r}; expected an integer in [2, 16]")
  return (1 << (int(bits) - 1)) - 1


def _grouped(mat: jax.Array, group_size: int | None) -> tuple[jax.Array, int]:
  k = mat.shape[-2]
  g = k if group_size is None else int(group_size)
  if g <= 0 or k % g:
    raise ValueError(f"group_size={group_size} must divide the {k} input features")
  return mat.reshape(*mat.shape[:-2], k // g, g, mat.shape[-1]), g


def quantize_codes(mat: jax.Array, bits: int, group_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Symmetric codes int32 [..., K, N] and float32 scales [..., K / group_size, N] of a matrix [..., K, N]."""
  m = qmax(bits)
  grouped, _ = _grouped(jnp.asarray(mat, jnp.float32), group_size)
  scales = jnp.max(jnp.abs(grouped), axis=-2) / m
  scales = jnp.where(scales > 0, scales, 1.0)
  codes = jnp.clip(jnp.round(grouped / scales[..., None, :]), -m, m).astype(jnp.int32)
  return codes.reshape(mat.shape), scales


def _straight_through(x: jax.Array, xq: jax.Array, ste_window: float | None) -> jax.Array:
  """xq forward; gradient 1 where |x| < ste_window (everywhere when None), else 0."""
  passed = x + jax.lax.stop_gradient(xq - x)
  if ste_window is None:
    return passed
  inside = jnp.abs(x) < ste_window
  return jnp.where(inside, passed, jax.lax.stop_gradient(xq))


def fake_quant_matrix(mat: jax.Array, bits: int, group_size: int | None = None, *,
                      ste_window: float | None = DEFAULT_STE_WINDOW) -> jax.Array:
  """Quantize-dequantize a matrix [..., K, N] per output channel (group_size None) or per group of input
  features, with the straight-through gradient."""
  x = jnp.asarray(mat)
  grouped, _ = _grouped(x.astype(jnp.float32), group_size)
  scales = jax.lax.stop_gradient(jnp.max(jnp.abs(grouped), axis=-2, keepdims=True) / qmax(bits))
  scales = jnp.where(scales > 0, scales, 1.0)
  m = qmax(bits)
  xq = (jnp.clip(jnp.round(grouped / scales), -m, m) * scales).reshape(x.shape).astype(x.dtype)
  return _straight_through(x, xq, ste_window)


@functools.partial(jax.jit, static_argnames=("num_input_axes", "bits", "group_size", "num_lead_axes",
                                             "ste_window"))
def fake_quant_weight(w: jax.Array, num_input_axes: int, bits: int, group_size: int | None = None, *,
                      num_lead_axes: int = 1, ste_window: float | None = DEFAULT_STE_WINDOW) -> jax.Array:
  """`fake_quant_matrix` of a lacax projection [lead..., in..., out...] (e.g. wq [L, D, H, hd]: one lead axis,
  one input axis), the same numbers `PackedWeight.quantize(...).dense()` gives."""
  lead = w.shape[:num_lead_axes]
  k = int(np.prod(w.shape[num_lead_axes:num_lead_axes + num_input_axes]))
  mat = w.reshape(*lead, k, -1)
  return fake_quant_matrix(mat, bits, group_size, ste_window=ste_window).reshape(w.shape)


def fake_quant_tokens(x: jax.Array, bits: int, *, ste_window: float | None = DEFAULT_STE_WINDOW) -> jax.Array:
  """Dynamic per-token activation quantization: one scale per token = max |x| over the last (hidden) axis."""
  xf = x.astype(jnp.float32)
  scales = jax.lax.stop_gradient(jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / qmax(bits))
  scales = jnp.where(scales > 0, scales, 1.0)
  m = qmax(bits)
  xq = (jnp.clip(jnp.round(xf / scales), -m, m) * scales).astype(x.dtype)
  return _straight_through(x, xq, ste_window)
