"""Decode-time products with packed low-bit weights as an XLA:CPU custom call (`cpu_quant_matmul.cc`).

`PackedWeight.project`'s XLA path dequantizes the whole weight to float32 every step and then runs the dot:
a decode step reads the codes, writes four bytes per weight and reads them back, so decode time does not fall
with the bit width. The kernel reads each packed code once, dequantizes it in registers and multiplies it
into the few rows of x that a decode step has (float32 arithmetic and accumulation).

It is an implementation detail of `lacax.model.quantized.PackedWeight.project`, used only where it computes
what the XLA path computes (that path is the reference, and the path everywhere else):
  * XLA:CPU (`lax.platform_dependent`: other backends never see the custom call);
  * one layer's weight (`data` of rank 2), or one layer of a stacked one (`PackedWeight.at_layer`: the
    decoder's scan passes packed weights whole, and the kernel reads the layer in place); 8-bit codes or codes
    packed two (3/4-bit) or four (2-bit) per byte, symmetric or affine (GGUF Q4_1 mins), float32 or float16
    scales, a group size that is a multiple of the codes per byte;
  * an einsum "<lead><in>,<in><out>-><lead><out>" (every layer projection of lacax.model.llama), with at most
    `MAX_ROWS` rows (the product of the lead axes: batch x new tokens); longer prefills keep XLA's GEMM, which
    amortises the dequantization over many rows;
  * float inputs (bfloat16/float16 ones are multiplied in float32 and the result rounded once: the XLA path
    rounds the dequantized weight to the input's dtype first, so the kernel is the closer of the two).
The same library streams two more kinds of weight at decode time, for the same reason (XLA:CPU's dot reads a
small-M product's weight at a fraction of the read bandwidth, and the decoder's scan copies every layer's
slice before the dot): dense float32 / bfloat16 / float16 layer projections read in place from the stacked
weights (`project_dense_group`, used through `lacax.model.llama.StreamedWeight`), and output-major tables such
as the LM head [vocab, hidden], dense or packed along hidden (`project_rows`, used by `unembed` and
`lacax.model.quantized.PackedTable`).
Differentiation goes through the XLA path (a custom JVP), so gradients never need the kernel. Under `vmap`
the call runs once per batch element ("sequential"). On a mesh, XLA's partitioner sees an opaque custom
call and gathers its operands (correct, not fast); sharded decode should run on an accelerator.

The library is built at first use by `lacax.model.cpu_kernels` (one build, cache and checksum mechanism for
lacax's CPU kernels). Without a compiler, or if the build fails, lacax logs one warning, "lacax: CPU low-bit
matmul kernel unavailable, using the pure-JAX path (<why>)", and uses the XLA path. `LACAX_CPU_KERNELS=0`
turns it off; `set_enabled` does the same from Python (call `jax.clear_caches()` afterwards: the choice is
made when a function is traced).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import cpu_kernels

SOURCE = Path(__file__).with_name("cpu_quant_matmul.cc")
KERNELS = cpu_kernels.KernelLibrary(SOURCE, {"lacax_quant_matmul": "LacaxQuantMatmul",
                                             "lacax_dense_matmul": "LacaxDenseMatmul",
                                             "lacax_sparse_matmul": "LacaxSparseMatmul",
                                             "lacax_rows_matmul": "LacaxRowsMatmul"},
                                    "CPU low-bit matmul kernel")
MAX_ROWS = 16  # rows of x (batch x tokens) up to which the kernel runs; more keep XLA's dequantize + GEMM
STORAGE_BITS = (8, 4, 2)
SCALE_DTYPES = (jnp.float32, jnp.float16)
INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
DENSE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)  # dense weights the kernel streams
ROWS_EQUATION = "btd,vd->btv"  # the LM head: x times an output-major table [vocab, hidden]


def set_enabled(enabled: bool) -> None:
  """Turns the kernel on or off for functions traced from now on (see the module docstring)."""
  KERNELS.set_enabled(enabled)


def available() -> bool:
  """Whether the kernel is enabled, built and registered (builds it on the first call); False off CPU."""
  return KERNELS.available()


def _lead_axes(equation: str, x_ndim: int, in_ndim: int, out_ndim: int) -> int | None:
  """The number of x's leading (row) axes if `equation` is "<lead><in>,<in><out>-><lead><out>", else None."""
  if "->" not in equation or "." in equation:
    return None
  inputs, out = equation.replace(" ", "").split("->")
  operands = inputs.split(",")
  if len(operands) != 2:
    return None
  xs, ws = operands
  if len(xs) != x_ndim or len(ws) != in_ndim + out_ndim or len(set(xs + ws)) != len(xs) + out_ndim:
    return None
  n_lead = x_ndim - in_ndim
  lead, contracted, produced = xs[:n_lead], ws[:in_ndim], ws[in_ndim:]
  if n_lead < 0 or xs[n_lead:] != contracted or out != lead + produced:
    return None
  return n_lead


def supports(w, x: jax.Array, equation: str) -> bool:
  """Static check: can the kernel compute `jnp.einsum(equation, x, w.dense())` for this PackedWeight?"""
  from lacax.model.quantized import storage_bits  # pylint: disable=g-import-not-at-top

  sb = storage_bits(w.bits)
  per_byte = 8 // sb
  k = int(np.prod(w.in_shape, dtype=np.int64))
  one_layer = w.data.ndim == (2 if w.layer is None else 3)
  if (not one_layer or sb not in STORAGE_BITS or w.group_size % per_byte or k % w.group_size
      or jnp.dtype(w.scales.dtype) not in SCALE_DTYPES or jnp.dtype(x.dtype) not in INPUT_DTYPES
      or (w.mins is not None and w.mins.dtype != w.scales.dtype)):
    return False
  n_lead = _lead_axes(equation, x.ndim, len(w.in_shape), len(w.out_shape))
  if n_lead is None or tuple(x.shape[n_lead:]) != tuple(w.in_shape):
    return False
  rows = int(np.prod(x.shape[:n_lead], dtype=np.int64))
  return 1 <= rows <= MAX_ROWS


def _call(x2: jax.Array, data: jax.Array, scales: jax.Array, mins: jax.Array, layer: jax.Array, *,
          storage_bits: int, group_size: int, affine: bool, target: str = "lacax_quant_matmul") -> jax.Array:
  """y [M, N] float32 = x2 [M, K] float32 @ layer `layer` of the stacked dequantized weight (operands as in the
  .cc header: data [L, K', N], scales [L, K / group_size, N])."""
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], data.shape[-1]), jnp.float32),
                          vmap_method="sequential")(
      x2, data, scales, mins, layer, storage_bits=np.int64(storage_bits), group_size=np.int64(group_size),
      affine=np.int64(affine))


def project(w, x: jax.Array, equation: str, reference, preferred_element_type=None) -> jax.Array:
  """`jnp.einsum(equation, x, w.dense(x.dtype))` with the kernel on CPU (call only where `supports`).

  Args:
    w: a `PackedWeight` of one layer (`data` of rank 2, or stacked with `layer` set).
    x: [lead..., in...] float input.
    equation: "<lead><in>,<in><out>-><lead><out>".
    reference: the XLA path, reference(x, w) -> the product (used off CPU and for derivatives).
    preferred_element_type: the result's dtype (None: x's dtype, as the XLA path gives).
  """
  from lacax.model.quantized import storage_bits  # pylint: disable=g-import-not-at-top

  n_lead = x.ndim - len(w.in_shape)
  lead = x.shape[:n_lead]
  rows, k = int(np.prod(lead, dtype=np.int64)), int(np.prod(w.in_shape, dtype=np.int64))
  out_dtype = preferred_element_type or x.dtype
  affine = w.mins is not None
  if w.layer is None:  # one layer: a stack of one (a bitcast, no copy)
    w = w.replace(data=w.data[None], scales=w.scales[None], mins=w.mins[None] if affine else None,
                  layer=jnp.zeros((), jnp.int32))
  mins = w.mins if affine else jnp.zeros((1,), w.scales.dtype)  # the custom call needs an operand

  def kernel(x, data, scales, mins, layer):
    y = _call(x.reshape(rows, k).astype(jnp.float32), data, scales, mins, layer,
              storage_bits=storage_bits(w.bits), group_size=w.group_size, affine=affine)
    return y.reshape(tuple(lead) + tuple(w.out_shape)).astype(out_dtype)

  def _reference(x, data, scales, mins, layer):
    return reference(x, w.replace(data=data, scales=scales, mins=mins if affine else None, layer=layer))

  return cpu_kernels.on_cpu(kernel, _reference, x, w.data, w.scales, mins, w.layer)


def _rows(x: jax.Array, n_lead: int) -> int:
  return int(np.prod(x.shape[:n_lead], dtype=np.int64))


def supports_dense(w_shape: tuple[int, ...], w_dtype, num_in: int, x: jax.Array, equation: str) -> bool:
  """Static check: can the kernel compute `jnp.einsum(equation, x, w)` for a dense weight of one layer's shape
  `w_shape` (in... axes, then out... axes; `num_in` input axes)?"""
  if jnp.dtype(w_dtype) not in DENSE_DTYPES or jnp.dtype(x.dtype) not in INPUT_DTYPES:
    return False
  in_shape, out_shape = tuple(w_shape[:num_in]), tuple(w_shape[num_in:])
  n_lead = _lead_axes(equation, x.ndim, len(in_shape), len(out_shape))
  if n_lead is None or tuple(x.shape[n_lead:]) != in_shape:
    return False
  return 1 <= _rows(x, n_lead) <= MAX_ROWS


def project_dense_group(datas: tuple[jax.Array, ...], layer: jax.Array, num_in: int, x: jax.Array, reference,
                        preferred_element_type=None) -> tuple[jax.Array, ...]:
  """`jnp.einsum(<lead><in>,<in><out_i>-><lead><out_i>, x, datas[i][layer])` for every weight, in one kernel
  call on CPU (one pass over the thread pool for, e.g., a layer's q, k and v); each weight [L, in..., out_i...]
  is read in place at layer `layer`, and all share a dtype and x's `num_in` input axes (call only where
  `supports_dense` holds for each).

  Args:
    reference: the XLA path, reference(x, datas, layer) -> the tuple of products (off CPU and for derivatives).
  """
  if len({jnp.dtype(d.dtype) for d in datas}) != 1:
    raise ValueError(f"project_dense_group: the weights' dtypes {[str(d.dtype) for d in datas]} differ; "
                     "expected one dtype")
  in_shape = datas[0].shape[1:1 + num_in]
  if any(d.shape[1:1 + num_in] != in_shape for d in datas):
    raise ValueError(f"project_dense_group: the weights' input axes {[d.shape[1:1 + num_in] for d in datas]} "
                     "differ; expected x's input axes for all")
  out_shapes = [d.shape[1 + num_in:] for d in datas]
  n_lead = x.ndim - num_in
  lead = x.shape[:n_lead]
  rows, k = _rows(x, n_lead), int(np.prod(in_shape, dtype=np.int64))
  ns = [int(np.prod(s, dtype=np.int64)) for s in out_shapes]
  # The einsum's result dtype (the weights share theirs).
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x.dtype, datas[0].dtype))

  # float32 and bfloat16 go in and come out as they are (the kernel widens and rounds); float16 is widened here.
  call_dtypes = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
  x_dtype = x.dtype if x.dtype in call_dtypes else jnp.float32
  y_dtype = out_dtype if out_dtype in call_dtypes else jnp.float32

  def kernel(x, datas, layer):
    ys = jax.ffi.ffi_call("lacax_dense_matmul", [jax.ShapeDtypeStruct((rows, n), y_dtype) for n in ns],
                          vmap_method="sequential")(x.reshape(rows, k).astype(x_dtype), layer,
                                                    *(d.reshape(d.shape[0], k, n) for d, n in zip(datas, ns)))
    return tuple(y.reshape(tuple(lead) + tuple(s)).astype(out_dtype) for y, s in zip(ys, out_shapes))

  return cpu_kernels.on_cpu(kernel, reference, x, tuple(datas), layer)


def supports_rows(table_shape: tuple[int, int], x: jax.Array, equation: str, *, storage_bits: int = 0,
                  group_size: int = 0, dtype=jnp.float32) -> bool:
  """Static check for `project_rows`: x [..., K] times an output-major table [N, K] by ROWS_EQUATION, dense
  (`storage_bits` 0, `dtype` a DENSE_DTYPES member) or codes (8, or 4 two per byte; groups of a multiple of
  16 x codes per byte)."""
  if equation.replace(" ", "") != ROWS_EQUATION or x.ndim != 3 or jnp.dtype(x.dtype) not in INPUT_DTYPES:
    return False
  n, k = table_shape
  if x.shape[-1] != k or not 1 <= x.shape[0] * x.shape[1] <= MAX_ROWS:
    return False
  if storage_bits == 0:
    return jnp.dtype(dtype) in DENSE_DTYPES
  per_byte = 8 // storage_bits if storage_bits in (8, 4) else 0
  return bool(per_byte) and group_size > 0 and group_size % (16 * per_byte) == 0 and k % group_size == 0


def project_rows(x: jax.Array, data: jax.Array, scales: jax.Array | None, mins: jax.Array | None, reference, *,
                 storage_bits: int = 0, group_size: int = 0, preferred_element_type=None) -> jax.Array:
  """logits [B, T, N] = x [B, T, K] times the table [N, K] (ROWS_EQUATION) with the kernel on CPU: `data` the
  dense table, or codes [N, K / per_byte] with scales (and mins) [N, K / group_size] (call only where
  `supports_rows`). reference(x, data, scales, mins) -> the product is the XLA path."""
  b, t, k = x.shape
  n = data.shape[0]
  out_dtype = preferred_element_type or x.dtype
  dummy = jnp.zeros((1,), jnp.float32)
  scales = dummy if scales is None else scales
  affine = mins is not None
  mins_op = mins if affine else jnp.zeros((1,), scales.dtype)

  def kernel(x, data, scales, mins):
    y = jax.ffi.ffi_call("lacax_rows_matmul", jax.ShapeDtypeStruct((b * t, n), jnp.float32),
                         vmap_method="sequential")(
        x.reshape(b * t, k).astype(jnp.float32), data, scales, mins, storage_bits=np.int64(storage_bits),
        group_size=np.int64(group_size), affine=np.int64(affine))
    return y.reshape(b, t, n).astype(out_dtype)

  def _reference(x, data, scales, mins):
    return reference(x, data, None if storage_bits == 0 else scales, mins if affine else None)

  return cpu_kernels.on_cpu(kernel, _reference, x, data, scales, mins_op)


def supports_sparse(w, x: jax.Array, equation: str) -> bool:
  """Static check for `project_sparse`: one layer of a `SparseWeight` in the projection form."""
  if w.layer is None or jnp.dtype(w.scales.dtype) not in SCALE_DTYPES or jnp.dtype(x.dtype) not in INPUT_DTYPES:
    return False
  n_lead = _lead_axes(equation, x.ndim, len(w.in_shape), len(w.out_shape))
  if n_lead is None or tuple(x.shape[n_lead:]) != tuple(w.in_shape):
    return False
  return 1 <= _rows(x, n_lead) <= MAX_ROWS


def project_sparse(w, x: jax.Array, reference, preferred_element_type=None) -> jax.Array:
  """`jnp.einsum(equation, x, w.dense())` for one layer of a `SparseWeight` with the kernel on CPU.
  reference(x, mask, values, offsets, scales, layer) is the XLA path."""
  n_lead = x.ndim - len(w.in_shape)
  lead = x.shape[:n_lead]
  rows, k = _rows(x, n_lead), int(np.prod(w.in_shape, dtype=np.int64))
  n = int(np.prod(w.out_shape, dtype=np.int64))
  out_dtype = preferred_element_type or x.dtype

  def kernel(x, mask, values, offsets, scales, layer):
    y = jax.ffi.ffi_call("lacax_sparse_matmul", jax.ShapeDtypeStruct((rows, n), jnp.float32),
                         vmap_method="sequential")(x.reshape(rows, k).astype(jnp.float32), mask, values, offsets,
                                                   scales, layer, group_size=np.int64(w.group_size))
    return y.reshape(tuple(lead) + tuple(w.out_shape)).astype(out_dtype)

  return cpu_kernels.on_cpu(kernel, reference, x, w.mask, w.values, w.offsets, w.scales, w.layer)
