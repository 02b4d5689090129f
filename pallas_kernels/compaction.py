"""Cache compaction: gather KV-cache slots by a per-(layer, row, kv head) index plan.

Every eviction policy (LaCache ladder, StreamingLLM, H2O, SnapKV, ...) ends in the same data movement: the
slots it keeps are copied, in order, to the front of a (possibly smaller) cache. The policy only produces the
plan; this module moves the bytes.

Layout (L = layers, B = batch, S = slots, KV = kv heads, D = head_dim):

  x:          [L, B, S, KV, D]       keys or values, any float dtype.
  src_index:  [L, B, S_out, KV]      int32; output slot o of (layer, row, head h) takes x[l, b, src, h];
                                     -1 (any negative value) = empty slot, written as zeros.
              [L, B, S_out]          the same plan for every kv head (content-agnostic policies); leading
                                     axes may also be 1 and broadcast (e.g. [L, 1, S_out, 1]).
  out:        [L, B, S_out, KV, D]   x.dtype, bitwise copies of the selected rows.

Indices >= S are invalid input; every implementation clamps them to S - 1 so that a bad plan cannot make a
kernel read out of bounds (the clamp costs one integer op and keeps all paths bitwise equal).

Three implementations with the same semantics:

* `reference_gather`: jax.numpy (`take_along_axis` + `where`); the CPU path and the test oracle.
* `pallas_gather(..., backend="gpu")`: Triton formulation. One program per (layer*row, block of output
  rows), where a row is one (output slot, kv head) pair of D elements. The program loads its indices,
  computes element offsets, does one masked gather-load of [rows, D_pad] and one masked store. Head dims that
  are not powers of two (80) are padded to the next power of two inside the program (Triton tensors must
  have power-of-two sizes) and masked, so no padding copy of the cache is ever made.
* `pallas_gather(..., backend="tpu")`: Mosaic formulation with DMAs. The cache stays in HBM
  (`memory_space=ANY`); each grid step (layer*row, block of output slots) receives its indices as an SMEM
  block (pipelined, so index latency is hidden), starts one DMA per kept slot ([KV, D], shared plan) or per
  kept (slot, head) row ([1, D], per-head plan) straight into the output VMEM block, waits for all of them,
  and writes zeros for empty slots. Pallas writes the block back to HBM while the next step's DMAs run. A
  scalar-prefetch design (index map reading the plan) would move one slot per grid step, and the full plan
  (16 MiB for Llama-3-8B at batch 8) would not fit SMEM; hence the DMA design.

Verification status (no GPU/TPU was available when this was written):
  * Both formulations are tested on CPU: the Triton one with `interpret=True`, the TPU one in TPU interpret
    mode (`pltpu.InterpretParams`, which simulates HBM/VMEM/SMEM, DMAs and semaphores and detects races),
    both bitwise equal to the reference.
  * Both lower on CPU to their backend IR (`jax.export` for platforms "cuda" and "tpu"): Triton IR (TTIR)
    and the Mosaic MLIR module. The Triton-to-PTX compile and Mosaic's layout passes run only on the
    device and are NOT verified. The riskiest part is the per-head TPU path: a [1, D] DMA into one sublane
    of a VMEM tile. If Mosaic rejects it, pass a shared plan ([L, B, S_out]) or `impl="reference"`.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

Backend = Literal["tpu", "gpu"]
Impl = Literal["auto", "pallas", "reference"]
# `interpret` accepts False/True, TPU interpret-mode params, or None (= interpret exactly when on CPU).
Interpret = bool | pltpu.InterpretParams | None

IMPLS = ("auto", "pallas", "reference")
BACKENDS = ("tpu", "gpu")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")

# Default output slots per grid step / program. TPU: enough DMAs in flight per step to hide HBM latency while
# the SMEM index block stays small; GPU: 8 slots x 8 heads = 64 rows of D per program (16 KiB at bf16, D=128).
DEFAULT_BLOCK_SLOTS = {"tpu": 64, "gpu": 8}
DEFAULT_NUM_WARPS = 4


# ----------------------------------------------------------------------------------------------------------
# Shared helpers (also used by pallas_kernels.merge).
# ----------------------------------------------------------------------------------------------------------


def resolve_backend(backend: Backend | None) -> Backend:
  """The kernel formulation to use: `backend` if given, else "tpu" on TPU and "gpu" everywhere else."""
  if backend is None:
    return "tpu" if jax.default_backend() == "tpu" else "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not supported; expected one of {BACKENDS} or None")
  return backend


def resolve_interpret(interpret: Interpret, backend: Backend) -> bool | pltpu.InterpretParams:
  """Turns the user's `interpret` into what `pl.pallas_call` needs for `backend`.

  None means "interpret exactly when running on CPU". The TPU formulation uses DMAs, semaphores and SMEM,
  which only TPU interpret mode simulates, so `True` becomes `pltpu.InterpretParams()` for it.
  """
  # interpret=False on CPU is allowed on purpose: it is how `jax.export(..., platforms=["tpu"/"cuda"])`
  # lowers the kernels for another platform (running it on CPU fails inside pallas_call).
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if backend == "tpu" and interpret is True:
    return pltpu.InterpretParams()
  if backend == "gpu" and isinstance(interpret, pltpu.InterpretParams):
    raise ValueError("interpret=pltpu.InterpretParams(...) is for backend='tpu'; use interpret=True for "
                     "the GPU (Triton) formulation")
  return interpret


def use_pallas(impl: Impl) -> bool:
  """Dispatcher rule: "auto" takes the Pallas kernel on TPU/GPU and the jax.numpy reference on CPU."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not supported; expected one of {IMPLS}")
  if impl == "auto":
    return jax.default_backend() == "tpu" or jax.default_backend() in _GPU_PLATFORMS
  return impl == "pallas"


def check_cache_array(x: jax.Array, name: str = "x") -> tuple[int, int, int, int, int]:
  if x.ndim != 5:
    raise ValueError(f"{name} must be [layers, batch, slots, kv_heads, head_dim]; got shape {x.shape}")
  if not (jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.int8):  # int8: quantized KV caches
    raise ValueError(f"{name} must have a floating or int8 dtype; got {x.dtype}")
  return x.shape


def normalize_plan(plan: jax.Array, x_shape: tuple[int, ...], name: str) -> tuple[jax.Array, bool]:
  """Broadcasts a slot plan to int32 [L, B, S_out, H] with H in {1, KV}; H == 1 means shared by all heads.

  Accepts [L, B, S_out] (shared) or [L, B, S_out, KV | 1], with L and B allowed to be 1 (broadcast).
  """
  num_layers, batch, _, kv_heads, _ = x_shape
  if not jnp.issubdtype(plan.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array; got dtype {plan.dtype}")
  if plan.ndim == 3:
    plan = plan[..., None]
  if plan.ndim != 4 or plan.shape[3] not in (1, kv_heads):
    raise ValueError(f"{name} must be [layers, batch, out_slots] or [layers, batch, out_slots, kv_heads] "
                     f"(kv_heads = {kv_heads} or 1); got shape {plan.shape}")
  for axis, size, label in ((0, num_layers, "layers"), (1, batch, "batch")):
    if plan.shape[axis] not in (1, size):
      raise ValueError(f"{name} axis {axis} ({label}) has size {plan.shape[axis]}; expected {size} or 1")
  shared = plan.shape[3] == 1
  target = (num_layers, batch, plan.shape[2], plan.shape[3])
  return jnp.broadcast_to(plan.astype(jnp.int32), target), shared


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def smem_chunk(n: int) -> int:
  """Smallest 1-D SMEM block length >= n that Mosaic accepts for 32-bit data.

  Mosaic requires a rank-1 block to be a power of two of at least 128 elements or a multiple of 1024.
  """
  if n <= 1024:
    return max(128, next_power_of_2(n))
  return pl.cdiv(n, 1024) * 1024


def blocked_smem_operand(values: jax.Array, block_slots: int, fill: int | float) -> tuple[jax.Array, int]:
  """Lays out per-slot scalars [LB, S_out, ...] as flat SMEM blocks, one per (lb, slot block).

  Returns (flat [LB * num_blocks * chunk], chunk): block (lb, j) holds the trailing values of slots
  [j * block_slots, (j + 1) * block_slots), flattened, padded with `fill` up to the legal SMEM chunk.
  """
  lb, s_out = values.shape[:2]
  per_slot = 1
  for d in values.shape[2:]:
    per_slot *= d
  num_blocks = pl.cdiv(s_out, block_slots)
  values = values.reshape(lb, s_out, per_slot)
  values = jnp.pad(values, ((0, 0), (0, num_blocks * block_slots - s_out), (0, 0)), constant_values=fill)
  values = values.reshape(lb, num_blocks, block_slots * per_slot)
  chunk = smem_chunk(block_slots * per_slot)
  values = jnp.pad(values, ((0, 0), (0, 0), (0, chunk - block_slots * per_slot)), constant_values=fill)
  return values.reshape(-1), chunk


def gpu_row_geometry(num_rows: int, block_slots: int, heads: int) -> int:
  """Rows (slot, head pairs) per Triton program: a power of two, at most the padded row count."""
  return min(next_power_of_2(block_slots * heads), next_power_of_2(num_rows))


# ----------------------------------------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------------------------------------


def reference_gather(x: jax.Array, src_index: jax.Array) -> jax.Array:
  """jax.numpy compaction gather; see the module docstring for shapes and semantics.

  Args:
    x: [L, B, S, KV, D] cache keys or values.
    src_index: int [L, B, S_out, KV] or [L, B, S_out] (shared by heads), broadcastable over L and B;
      negative = empty output slot.

  Returns:
    [L, B, S_out, KV, D] in x.dtype: out[l, b, o, h] = x[l, b, src_index[l, b, o, h], h], zeros where empty.
  """
  slots = check_cache_array(x)[2]
  plan, _ = normalize_plan(src_index, x.shape, "src_index")
  # A shared plan stays [.., 1, 1] so XLA gathers whole [KV, D] slabs.
  safe = jnp.clip(plan, 0, slots - 1)[..., None]
  out = jnp.take_along_axis(x, safe, axis=2, mode="promise_in_bounds")
  return jnp.where((plan >= 0)[..., None], out, jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------------------------------------
# GPU (Triton) formulation.
# ----------------------------------------------------------------------------------------------------------


def gpu_columns(head_dim: int) -> tuple[jax.Array, jax.Array | None]:
  """Column iota [D_pad] (D rounded up to a power of two, as Triton tensors require) and its in-range mask.

  The mask is None when D is a power of two, so that Triton sees masks constant along the row and can
  vectorise the accesses.
  """
  d_pad = next_power_of_2(head_dim)
  col = lax.broadcasted_iota(jnp.int32, (d_pad,), 0)
  return col, (None if d_pad == head_dim else col < head_dim)


def gpu_row_mask(row_mask: jax.Array, col_ok: jax.Array | None, d_pad: int) -> jax.Array:
  """[rows, D_pad] access mask from a per-row mask and the optional column mask."""
  if col_ok is None:
    return jnp.broadcast_to(row_mask[:, None], (row_mask.shape[0], d_pad))
  return row_mask[:, None] & col_ok[None, :]


def _gpu_gather_kernel(idx_ref, x_ref, o_ref, *, kv_heads, rows, num_rows, slots, shared):
  """One program: `rows` consecutive output rows (row = slot * KV + head) of one (layer, batch-row).

  idx_ref: [S_out] (shared) or [S_out * KV] int32; x_ref: [S * KV, D]; o_ref: [S_out * KV, D].
  Accesses index rows and columns separately (2-D gather), so the column offsets stay a contiguous
  `make_range` that Triton vectorises. Masked-off lanes are never dereferenced on the GPU; in interpret
  mode they are out of bounds (padding columns, rows past the end), which gathers clamp and scatters drop.
  """
  col, col_ok = gpu_columns(x_ref.shape[1])
  row = pl.program_id(1) * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
  row_ok = row < num_rows
  idx_pos = lax.div(row, kv_heads) if shared else row  # row >= 0: truncating div
  src = plgpu.load(idx_ref.at[jnp.where(row_ok, idx_pos, 0)], mask=row_ok, other=-1)
  keep = row_ok & (src >= 0)
  src_row = jnp.where(keep, jnp.minimum(src, slots - 1) * kv_heads + lax.rem(row, kv_heads), 0)
  vals = plgpu.load(x_ref.at[src_row[:, None], col[None, :]], mask=gpu_row_mask(keep, col_ok, col.shape[0]),
                    other=0)
  plgpu.store(o_ref.at[row[:, None], col[None, :]], vals, mask=gpu_row_mask(row_ok, col_ok, col.shape[0]))


def _gpu_gather(x, plan, shared, *, interpret, block_slots, num_warps):
  num_layers, batch, slots, kv_heads, head_dim = x.shape
  lb, s_out = num_layers * batch, plan.shape[2]
  num_rows = s_out * kv_heads
  rows = gpu_row_geometry(num_rows, block_slots, kv_heads)
  idx = plan.reshape(lb, s_out * plan.shape[3])
  kernel = functools.partial(_gpu_gather_kernel, kv_heads=kv_heads, rows=rows, num_rows=num_rows,
                             slots=slots, shared=shared)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((lb, num_rows, head_dim), x.dtype),
      grid=(lb, pl.cdiv(num_rows, rows)),
      in_specs=[
          pl.BlockSpec((None, idx.shape[1]), lambda i, j: (i, 0)),
          pl.BlockSpec((None, slots * kv_heads, head_dim), lambda i, j: (i, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, num_rows, head_dim), lambda i, j: (i, 0, 0)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="lacax_gather_gpu",
  )(idx, x.reshape(lb, slots * kv_heads, head_dim))
  return out.reshape(num_layers, batch, s_out, kv_heads, head_dim)


# ----------------------------------------------------------------------------------------------------------
# TPU (Mosaic) formulation.
# ----------------------------------------------------------------------------------------------------------


def _tpu_gather_kernel(idx_ref, x_hbm, o_ref, sem, *, block_slots, slots, shared):
  """One grid step: `block_slots` output slots of one (layer, batch-row).

  idx_ref: SMEM [chunk] int32, slot-major (slot * H + head); x_hbm: [LB, S, KV, D] in HBM;
  o_ref: VMEM [1, block_slots, KV, D]; sem: one DMA semaphore shared by all copies of the step.
  """
  lb = pl.program_id(0)
  # The output block keeps its unit leading axis: with a squeezed (None) block axis, jax 0.10.2's Mosaic
  # lowering emits a mis-ranked memref slice for a DMA into `o_ref.at[slot]`.
  o_ref = o_ref.at[0]
  kv_heads, head_dim = o_ref.shape[1], o_ref.shape[2]
  heads = 1 if shared else kv_heads

  def copy(slot, head):
    src = idx_ref[slot * heads + head]
    safe = jnp.clip(src, 0, slots - 1)
    if shared:
      desc = pltpu.make_async_copy(x_hbm.at[lb, safe], o_ref.at[slot], sem)
    else:
      desc = pltpu.make_async_copy(x_hbm.at[lb, safe, pl.ds(head, 1)], o_ref.at[slot, pl.ds(head, 1)], sem)
    return src >= 0, desc

  def start(slot, carry):
    for head in range(heads):
      keep, desc = copy(slot, head)
      pl.when(keep)(desc.start)
    return carry

  def finish(slot, carry):
    for head in range(heads):
      keep, desc = copy(slot, head)
      pl.when(keep)(desc.wait)

      @pl.when(jnp.logical_not(keep))
      def _():
        if shared:
          o_ref[slot] = jnp.zeros((kv_heads, head_dim), o_ref.dtype)
        else:
          o_ref[slot, pl.ds(head, 1)] = jnp.zeros((1, head_dim), o_ref.dtype)

    return carry

  # All copies are issued before the first wait so that up to block_slots * H DMAs are in flight; every copy
  # has the same size, so the waits may consume the shared semaphore in any order.
  lax.fori_loop(0, block_slots, start, 0)
  lax.fori_loop(0, block_slots, finish, 0)


def _tpu_gather(x, plan, shared, *, interpret, block_slots):
  num_layers, batch, slots, kv_heads, head_dim = x.shape
  lb, s_out = num_layers * batch, plan.shape[2]
  block_slots = min(block_slots, s_out)
  num_blocks = pl.cdiv(s_out, block_slots)
  idx, chunk = blocked_smem_operand(plan.reshape(lb, s_out, plan.shape[3]), block_slots, fill=-1)
  kernel = functools.partial(_tpu_gather_kernel, block_slots=block_slots, slots=slots, shared=shared)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((lb, s_out, kv_heads, head_dim), x.dtype),
      grid=(lb, num_blocks),
      in_specs=[
          pl.BlockSpec((chunk,), lambda i, j: (i * num_blocks + j,), memory_space=pltpu.SMEM),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((1, block_slots, kv_heads, head_dim), lambda i, j: (i, j, 0, 0)),
      scratch_shapes=[pltpu.SemaphoreType.DMA(())],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      name="lacax_gather_tpu",
  )(idx, x.reshape(lb, slots, kv_heads, head_dim))
  return out.reshape(num_layers, batch, s_out, kv_heads, head_dim)


# ----------------------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------------------


def pallas_gather(x: jax.Array, src_index: jax.Array, *, backend: Backend | None = None,
                  interpret: Interpret = None, block_slots: int | None = None,
                  num_warps: int | None = None) -> jax.Array:
  """Pallas compaction gather, bitwise equal to `reference_gather`.

  Args:
    x: [L, B, S, KV, D] cache keys or values (f32, bf16, ...; any D, e.g. 64, 80, 128).
    src_index: int [L, B, S_out, KV], or [L, B, S_out] / [L, B, S_out, 1] for a plan shared by all kv heads
      (fewer, larger DMAs on TPU); L and B may be 1 (broadcast). Negative = empty slot (zeros).
    backend: "tpu" (Mosaic, DMA gather) or "gpu" (Triton); None picks "tpu" on TPU and "gpu" otherwise.
    interpret: None = interpret exactly on CPU; True = interpret (TPU interpret mode for backend "tpu");
      or explicit `pltpu.InterpretParams(...)` for backend "tpu".
    block_slots: output slots per grid step (TPU) or per program, rounded up so that block_slots * KV is a
      power of two (GPU). Defaults: `DEFAULT_BLOCK_SLOTS`.
    num_warps: Triton warps per program (GPU only; default 4).

  Returns:
    [L, B, S_out, KV, D] in x.dtype.
  """
  check_cache_array(x)
  backend = resolve_backend(backend)
  plan, shared = normalize_plan(src_index, x.shape, "src_index")
  block_slots = DEFAULT_BLOCK_SLOTS[backend] if block_slots is None else block_slots
  if block_slots < 1:
    raise ValueError(f"block_slots={block_slots} must be >= 1")
  interpret = resolve_interpret(interpret, backend)
  if backend == "tpu":
    return _tpu_gather(x, plan, shared, interpret=interpret, block_slots=block_slots)
  return _gpu_gather(x, plan, shared, interpret=interpret, block_slots=block_slots,
                     num_warps=DEFAULT_NUM_WARPS if num_warps is None else num_warps)


def gather(x: jax.Array, src_index: jax.Array, *, impl: Impl = "auto", interpret: Interpret = None,
           backend: Backend | None = None, block_slots: int | None = None) -> jax.Array:
  """The compaction gather the library calls: out[l, b, o, h] = x[l, b, src_index[l, b, o, h], h].

  Args:
    x: [L, B, S, KV, D].
    src_index: int [L, B, S_out, KV] or [L, B, S_out] (shared by heads); negative = empty (zeros).
    impl: "auto" = Pallas kernel on TPU/GPU, jax.numpy reference on CPU; "pallas"; "reference".
    interpret, backend, block_slots: passed to `pallas_gather` (ignored by the reference).

  Returns:
    [L, B, S_out, KV, D] in x.dtype.
  """
  if use_pallas(impl):
    return pallas_gather(x, src_index, backend=backend, interpret=interpret, block_slots=block_slots)
  return reference_gather(x, src_index)
