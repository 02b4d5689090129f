"""Low-precision matrix products with float32 accumulation, forward and backward: `lowp_einsum`.

A bfloat16 (or float16) product is only fast when it is computed as one: operands in the low dtype, products
accumulated in float32. Two things keep the plain `jnp.einsum` from doing that on XLA:CPU (measured on
AMD Zen 4, jax 0.10.2, [512, 576] x [576, 1536]):

* a bfloat16 x bfloat16 -> bfloat16 dot is rewritten into float32 operands and a float32 dot (150 GFLOP/s,
  slower than float32 itself at 190); with `preferred_element_type=float32` the same dot runs natively
  (340-410 GFLOP/s);
* the transpose of a dot with `preferred_element_type=float32` multiplies the float32 cotangent with the
  bfloat16 operand, a mixed dot that XLA again computes in float32.

`lowp_einsum` is a `custom_vjp` whose forward and both backward products take `dtype` operands with float32
accumulation. Its operands may come in any float dtype (float32 master weights, a float32 residual stream):
they are cast where they are used, the residuals are kept in the dtype they came in (XLA:CPU also rewrites a
bfloat16 `dynamic-update-slice`, the way a layer scan stacks residuals, into a pass over the whole float32
stack per layer) and the gradients return in the operands' own dtypes, so float32 weights get float32
gradients from inside the layer scan. The cotangent is rounded to `dtype` before the backward products, as a
bfloat16 backward pass does anyway.

Numbers: on CPU the forward equals `jnp.einsum` of the cast operands bit for bit (XLA computes that one in
float32 and rounds once, too); elsewhere it equals it up to the backend's accumulation order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _transposed(equation: str) -> tuple[str, str]:
  """The einsums of the two operands' gradients of `x, w -> out` (every index of an operand must appear in
  the other operand or the output: a projection, not a reduction of one operand on its own)."""
  inputs, out = equation.replace(" ", "").split("->")
  x, w = inputs.split(",")
  for name, sub, others in (("first", x, w + out), ("second", w, x + out)):
    if "." in sub or any(c not in others for c in sub):
      raise ValueError(f"lowp_einsum equation {equation!r}: every index of the {name} operand must appear in the "
                       "other operand or the output (no ellipsis)")
  return f"{out},{w}->{x}", f"{x},{out}->{w}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def lowp_einsum(equation: str, x: jax.Array, w: jax.Array, dtype, out_dtype) -> jax.Array:
  """einsum(equation, x, w) with `dtype` operands and float32 accumulation, returned in `out_dtype`.

  Args:
    equation: a two-operand einsum in which every index of an operand appears in the other or the output.
    x, w: float arrays of any dtypes (cast to `dtype` here).
    dtype: the operands' product dtype (bfloat16, float16; float32 works too and is a plain einsum).
    out_dtype: the result's dtype (float32 keeps the accumulator).
  """
  return _forward(equation, x, w, dtype, out_dtype)


def _forward(equation, x, w, dtype, out_dtype):
  return jnp.einsum(equation, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
                    ).astype(out_dtype)


def _fwd(equation, x, w, dtype, out_dtype):
  return _forward(equation, x, w, dtype, out_dtype), (x, w)


def _bwd(equation, dtype, out_dtype, residuals, g):
  del out_dtype
  x, w = residuals
  dx_eq, dw_eq = _transposed(equation)
  g = g.astype(dtype)
  xl, wl = x.astype(dtype), w.astype(dtype)
  dx = jnp.einsum(dx_eq, g, wl, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.einsum(dw_eq, xl, g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


lowp_einsum.defvjp(_fwd, _bwd)
