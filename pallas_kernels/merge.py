"""Segment merge: collapse runs of consecutive cache slots into one weighted slot (KVMerger-style).

A merging policy keeps S_out output slots per (layer, batch-row, kv head); output slot o is the weighted sum
of a run of consecutive source slots:

  out[l, b, o, h] = sum_{m < run_len[l, b, o, h]} weight[l, b, s, h] * x[l, b, s, h],  s = start[l, b, o, h] + m

Layout (L = layers, B = batch, S = slots, KV = kv heads, D = head_dim):

  x:        [L, B, S, KV, D]        keys or values, any float dtype.
  start:    [L, B, S_out, KV] int   first source slot of each run; [L, B, S_out] = same runs for every head.
  run_len:  [L, B, S_out, KV] int   run length in [0, max_run]; 0 = empty output slot (zeros). Same
                                    head-sharing rule as `start`; L and B may be 1 (broadcast) for both.
  weight:   [L, B, S, KV] float32   per-source-slot weight (e.g. the KVMerger Gaussian kernel weights,
                                    normalised within each run by the policy); [L, B, S] = shared by heads.
  out:      [L, B, S_out, KV, D]    x.dtype; accumulated in float32 in the order m = 0, 1, ..., then cast.

`max_run` is static: the largest run any policy may emit. Slots outside a run never contribute, even if they
hold inf/NaN. Source slots start + m >= S are clamped to S - 1 for memory safety (invalid input).

Implementations (see pallas_kernels.compaction for the design notes shared with the gather):

* `reference_segment_merge`: jax.numpy, `max_run` gathers of [L, B, S_out, KV, D] accumulated in float32.
* GPU (Triton): one program per (layer*row, block of output rows); per m a masked gather-load of the
  run's m-th row and its weight, a float32 accumulate in registers, one store. Reads only rows inside runs.
* TPU (Mosaic): per grid step, DMAs (one per run member: [KV, D] for shared runs, [1, D] per head
  otherwise) gather the block's runs into a VMEM scratch [max_run, block_slots, KV, D]; weights come as
  scalars through SMEM, pre-gathered per (slot, m, head) by a small XLA gather (S_out * max_run * KV
  floats, ~1/D of the cache traffic). The per-head weight tile is built with KV selects, which keeps every
  vector op on whole [KV, D] tiles (no lane-to-sublane relayout), at the price of being VPU-bound rather than
  HBM-bound for large max_run * KV.

Verification status: as for the gather, both formulations are tested on CPU in interpret mode (allclose to
the reference) and lower to Triton IR / Mosaic MLIR on CPU; neither was compiled or run on a GPU or TPU.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.compaction import Backend
from pallas_kernels.compaction import blocked_smem_operand
from pallas_kernels.compaction import check_cache_array
from pallas_kernels.compaction import DEFAULT_NUM_WARPS
from pallas_kernels.compaction import gpu_row_geometry
from pallas_kernels.compaction import Impl
from pallas_kernels.compaction import Interpret
from pallas_kernels.compaction import gpu_columns
from pallas_kernels.compaction import gpu_row_mask
from pallas_kernels.compaction import normalize_plan
from pallas_kernels.compaction import resolve_backend
from pallas_kernels.compaction import resolve_interpret
from pallas_kernels.compaction import use_pallas

# TPU: the VMEM scratch holds max_run * block_slots slabs and SMEM holds block_slots * max_run * KV weights,
# so blocks are smaller than for the gather. GPU: as for the gather (rows of D per program = slots * KV).
DEFAULT_BLOCK_SLOTS = {"tpu": 32, "gpu": 8}


def _normalize_inputs(x, start, run_len, weight, max_run):
  """Validates shapes and returns (start, run_len [L, B, S_out, H] int32, weight [L, B, S, KV] f32, shared)."""
  num_layers, batch, slots, kv_heads, _ = check_cache_array(x)
  if not isinstance(max_run, int) or max_run < 1:
    raise ValueError(f"max_run={max_run!r} must be a static int >= 1")
  start, start_shared = normalize_plan(start, x.shape, "start")
  run_len, run_shared = normalize_plan(run_len, x.shape, "run_len")
  if start.shape[2] != run_len.shape[2]:
    raise ValueError(f"start and run_len must have the same out_slots; got {start.shape} and {run_len.shape}")
  shared = start_shared and run_shared
  if not shared:  # one per-head operand makes both per-head
    start = jnp.broadcast_to(start, start.shape[:3] + (kv_heads,))
    run_len = jnp.broadcast_to(run_len, run_len.shape[:3] + (kv_heads,))
  if weight.ndim == 3:
    weight = weight[..., None]
  if weight.ndim != 4 or weight.shape[2] != slots:
    raise ValueError(f"weight must be [layers, batch, slots({slots}), kv_heads] or [layers, batch, slots]; "
                     f"got shape {weight.shape}")
  try:
    weight = jnp.broadcast_to(weight.astype(jnp.float32), (num_layers, batch, slots, kv_heads))
  except ValueError as e:
    raise ValueError(f"weight of shape {weight.shape} does not broadcast to {(num_layers, batch, slots, kv_heads)}"
                     ) from e
  return start, run_len, weight, shared


# ----------------------------------------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------------------------------------


def reference_segment_merge(x: jax.Array, start: jax.Array, run_len: jax.Array, weight: jax.Array, *,
                            max_run: int) -> jax.Array:
  """jax.numpy segment merge; see the module docstring for shapes and semantics.

  Args:
    x: [L, B, S, KV, D].
    start, run_len: int [L, B, S_out, KV] or [L, B, S_out] (shared by heads).
    weight: float [L, B, S, KV] (or [L, B, S]).
    max_run: static upper bound on run_len.

  Returns:
    [L, B, S_out, KV, D] in x.dtype.
  """
  slots = x.shape[2]
  start, run_len, weight, _ = _normalize_inputs(x, start, run_len, weight, max_run)
  acc = jnp.zeros(start.shape[:3] + x.shape[3:], jnp.float32)
  for m in range(max_run):
    src = jnp.clip(start + m, 0, slots - 1)  # [L, B, S_out, H]; H = 1 gathers whole [KV, D] slabs
    rows = jnp.take_along_axis(x, src[..., None], axis=2, mode="promise_in_bounds").astype(jnp.float32)
    w = jnp.take_along_axis(weight, src, axis=2, mode="promise_in_bounds")
    acc = acc + jnp.where((m < run_len)[..., None], w[..., None] * rows, 0.0)
  return acc.astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# GPU (Triton) formulation.
# ----------------------------------------------------------------------------------------------------------


def _gpu_merge_kernel(start_ref, len_ref, w_ref, x_ref, o_ref, *, kv_heads, rows, num_rows, slots, max_run,
                      shared):
  """One program: `rows` output rows (row = slot * KV + head) of one (layer, batch-row).

  start_ref, len_ref: [S_out] (shared) or [S_out * KV] int32; w_ref: [S * KV] f32; x_ref: [S * KV, D];
  o_ref: [S_out * KV, D]. Masking as in `compaction._gpu_gather_kernel`.
  """
  col, col_ok = gpu_columns(x_ref.shape[1])
  d_pad = col.shape[0]
  row = pl.program_id(1) * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
  row_ok = row < num_rows
  plan_pos = jnp.where(row_ok, lax.div(row, kv_heads) if shared else row, 0)  # row >= 0
  first = plgpu.load(start_ref.at[plan_pos], mask=row_ok, other=0)
  length = plgpu.load(len_ref.at[plan_pos], mask=row_ok, other=0)
  head = lax.rem(row, kv_heads)

  def accumulate(m, acc):
    take = row_ok & (m < length)
    src_row = jnp.where(take, jnp.clip(first + m, 0, slots - 1) * kv_heads + head, 0)
    w = plgpu.load(w_ref.at[src_row], mask=take, other=0.0)
    # Lanes outside the run load zeros (never dereferenced), so they add exactly 0 even next to inf/NaN.
    vals = plgpu.load(x_ref.at[src_row[:, None], col[None, :]], mask=gpu_row_mask(take, col_ok, d_pad),
                      other=0)
    return acc + w[:, None] * vals.astype(jnp.float32)

  acc = jnp.zeros((rows, d_pad), jnp.float32)
  if max_run <= 16:  # unrolled: all run members' loads can be in flight at once
    for m in range(max_run):
      acc = accumulate(m, acc)
  else:
    acc = lax.fori_loop(0, max_run, accumulate, acc)
  plgpu.store(o_ref.at[row[:, None], col[None, :]], acc.astype(o_ref.dtype),
              mask=gpu_row_mask(row_ok, col_ok, d_pad))


def _gpu_merge(x, start, run_len, weight, shared, *, max_run, interpret, block_slots, num_warps):
  num_layers, batch, slots, kv_heads, head_dim = x.shape
  lb, s_out = num_layers * batch, start.shape[2]
  num_rows = s_out * kv_heads
  rows = gpu_row_geometry(num_rows, block_slots, kv_heads)
  plan_len = s_out * start.shape[3]
  kernel = functools.partial(_gpu_merge_kernel, kv_heads=kv_heads, rows=rows, num_rows=num_rows, slots=slots,
                             max_run=max_run, shared=shared)
  slab = lambda *shape: pl.BlockSpec((None, *shape), lambda i, j: (i,) + (0,) * len(shape))  # noqa: E731
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((lb, num_rows, head_dim), x.dtype),
      grid=(lb, pl.cdiv(num_rows, rows)),
      in_specs=[slab(plan_len), slab(plan_len), slab(slots * kv_heads), slab(slots * kv_heads, head_dim)],
      out_specs=slab(num_rows, head_dim),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="lacax_segment_merge_gpu",
  )(start.reshape(lb, plan_len), run_len.reshape(lb, plan_len), weight.reshape(lb, slots * kv_heads),
    x.reshape(lb, slots * kv_heads, head_dim))
  return out.reshape(num_layers, batch, s_out, kv_heads, head_dim)


# ----------------------------------------------------------------------------------------------------------
# TPU (Mosaic) formulation.
# ----------------------------------------------------------------------------------------------------------


def _tpu_merge_kernel(start_ref, len_ref, w_ref, x_hbm, o_ref, buf, sem, *, block_slots, slots, max_run,
                      shared):
  """One grid step: `block_slots` output slots of one (layer, batch-row).

  start_ref, len_ref: SMEM [chunk] int32, slot-major (slot * H + head); w_ref: SMEM [chunk] f32 laid out
  (slot * max_run + m) * KV + head, zero outside runs; x_hbm: [LB, S, KV, D] in HBM;
  o_ref: VMEM [block_slots, KV, D]; buf: VMEM [max_run, block_slots, KV, D] x.dtype; sem: DMA semaphore.
  """
  lb = pl.program_id(0)
  kv_heads, head_dim = o_ref.shape[1], o_ref.shape[2]
  heads = 1 if shared else kv_heads

  def copy(slot, m, head):
    plan = slot * heads + head
    src = jnp.clip(start_ref[plan] + m, 0, slots - 1)
    if shared:
      desc = pltpu.make_async_copy(x_hbm.at[lb, src], buf.at[m, slot], sem)
    else:
      desc = pltpu.make_async_copy(x_hbm.at[lb, src, pl.ds(head, 1)], buf.at[m, slot, pl.ds(head, 1)], sem)
    return m < len_ref[plan], desc

  def for_each_copy(action):
    def body(slot, carry):
      for m in range(max_run):
        for head in range(heads):
          take, desc = copy(slot, m, head)
          pl.when(take)(getattr(desc, action))
      return carry

    lax.fori_loop(0, block_slots, body, 0)

  # Issue every run member's DMA of the block before the first wait (all copies have the same size, so the
  # shared semaphore may be consumed in any order).
  for_each_copy("start")
  for_each_copy("wait")

  head_of_row = lax.broadcasted_iota(jnp.int32, (kv_heads, head_dim), 0)

  def per_head_tile(scalar_at, dtype):
    """[KV, D] tile whose row h is the SMEM scalar scalar_at(h), built from whole-tile selects."""
    tile = jnp.zeros((kv_heads, head_dim), dtype)
    for head in range(kv_heads):
      tile = jnp.where(head_of_row == head, scalar_at(head), tile)
    return tile

  def combine(slot, carry):
    if shared:
      length = jnp.full((kv_heads, head_dim), len_ref[slot], jnp.int32)
    else:
      length = per_head_tile(lambda h: len_ref[slot * kv_heads + h], jnp.int32)
    acc = jnp.zeros((kv_heads, head_dim), jnp.float32)
    for m in range(max_run):
      w = per_head_tile(lambda h, m=m: w_ref[(slot * max_run + m) * kv_heads + h], jnp.float32)
      # Rows past the run were never copied (stale or uninitialised VMEM): select, do not multiply by 0.
      acc = acc + jnp.where(m < length, w * buf[m, slot].astype(jnp.float32), 0.0)
    o_ref[slot] = acc.astype(o_ref.dtype)
    return carry

  lax.fori_loop(0, block_slots, combine, 0)


def _tpu_merge(x, start, run_len, weight, shared, *, max_run, interpret, block_slots):
  num_layers, batch, slots, kv_heads, head_dim = x.shape
  lb, s_out = num_layers * batch, start.shape[2]
  block_slots = min(block_slots, s_out)
  num_blocks = pl.cdiv(s_out, block_slots)
  heads = start.shape[3]
  # Weights of every run member, [LB, S_out, max_run, KV] f32, zero outside runs: a gather of ~1/D of the
  # cache traffic that lets the kernel read weights as SMEM scalars.
  m = jnp.arange(max_run, dtype=jnp.int32)
  src = jnp.clip(start[:, :, :, None, :] + m[:, None], 0, slots - 1)  # [L, B, S_out, max_run, H]
  src = jnp.broadcast_to(src, src.shape[:4] + (kv_heads,))
  w_run = jnp.take_along_axis(weight[:, :, :, None, :], src, axis=2, mode="promise_in_bounds")
  w_run = jnp.where(m[:, None] < run_len[:, :, :, None, :], w_run, 0.0)
  start_flat, chunk = blocked_smem_operand(start.reshape(lb, s_out, heads), block_slots, fill=0)
  len_flat, _ = blocked_smem_operand(run_len.reshape(lb, s_out, heads), block_slots, fill=0)
  w_flat, w_chunk = blocked_smem_operand(w_run.reshape(lb, s_out, max_run, kv_heads), block_slots, fill=0.0)
  smem_block = lambda n: pl.BlockSpec((n,), lambda i, j: (i * num_blocks + j,),  # noqa: E731
                                      memory_space=pltpu.SMEM)
  kernel = functools.partial(_tpu_merge_kernel, block_slots=block_slots, slots=slots, max_run=max_run,
                             shared=shared)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((lb, s_out, kv_heads, head_dim), x.dtype),
      grid=(lb, num_blocks),
      in_specs=[smem_block(chunk), smem_block(chunk), smem_block(w_chunk), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((None, block_slots, kv_heads, head_dim), lambda i, j: (i, j, 0, 0)),
      scratch_shapes=[pltpu.VMEM((max_run, block_slots, kv_heads, head_dim), x.dtype),
                      pltpu.SemaphoreType.DMA(())],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      name="lacax_segment_merge_tpu",
  )(start_flat, len_flat, w_flat, x.reshape(lb, slots, kv_heads, head_dim))
  return out.reshape(num_layers, batch, s_out, kv_heads, head_dim)


# ----------------------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------------------


def pallas_segment_merge(x: jax.Array, start: jax.Array, run_len: jax.Array, weight: jax.Array, *,
                         max_run: int, backend: Backend | None = None, interpret: Interpret = None,
                         block_slots: int | None = None, num_warps: int | None = None) -> jax.Array:
  """Pallas segment merge, allclose to `reference_segment_merge` (float32 accumulation in the same order).

  Args:
    x: [L, B, S, KV, D].
    start, run_len: int [L, B, S_out, KV], or [L, B, S_out] for runs shared by all kv heads.
    weight: float [L, B, S, KV] (or [L, B, S]).
    max_run: static upper bound on run_len.
    backend, interpret, block_slots, num_warps: as in `pallas_kernels.compaction.pallas_gather`.

  Returns:
    [L, B, S_out, KV, D] in x.dtype.
  """
  start, run_len, weight, shared = _normalize_inputs(x, start, run_len, weight, max_run)
  backend = resolve_backend(backend)
  block_slots = DEFAULT_BLOCK_SLOTS[backend] if block_slots is None else block_slots
  if block_slots < 1:
    raise ValueError(f"block_slots={block_slots} must be >= 1")
  interpret = resolve_interpret(interpret, backend)
  if backend == "tpu":
    return _tpu_merge(x, start, run_len, weight, shared, max_run=max_run, interpret=interpret,
                      block_slots=block_slots)
  return _gpu_merge(x, start, run_len, weight, shared, max_run=max_run, interpret=interpret,
                    block_slots=block_slots, num_warps=DEFAULT_NUM_WARPS if num_warps is None else num_warps)


def segment_merge(x: jax.Array, start: jax.Array, run_len: jax.Array, weight: jax.Array, *, max_run: int,
                  impl: Impl = "auto", interpret: Interpret = None, backend: Backend | None = None,
                  block_slots: int | None = None) -> jax.Array:
  """The segment merge the library calls; "auto" = Pallas on TPU/GPU, jax.numpy reference on CPU.

  Args:
    x: [L, B, S, KV, D].
    start, run_len: int [L, B, S_out, KV] or [L, B, S_out]; run_len 0 = empty output slot.
    weight: float [L, B, S, KV] (or [L, B, S]).
    max_run: static upper bound on run_len.
    impl: "auto", "pallas" or "reference".
    interpret, backend, block_slots: passed to `pallas_segment_merge`.

  Returns:
    [L, B, S_out, KV, D] in x.dtype.
  """
  if use_pallas(impl):
    return pallas_segment_merge(x, start, run_len, weight, max_run=max_run, backend=backend,
                                interpret=interpret, block_slots=block_slots)
  return reference_segment_merge(x, start, run_len, weight, max_run=max_run)
