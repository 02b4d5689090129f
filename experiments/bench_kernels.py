"""Benchmark the cache-compaction kernels: jax.numpy reference vs Pallas, as achieved HBM bandwidth.

  python -m experiments.bench_kernels                       # Llama-3-8B cache, batch 1,2,4,8, bf16
  python -m experiments.bench_kernels --batch_sizes=1 --layers=2 --block_slots=4,8,16   # quick / sweep

Compaction is pure data movement, so the figure of merit is bandwidth: bytes that must cross HBM (rows
read + rows written + plan/weight bytes) divided by the median wall time of a jitted call. Each
(kernel, batch, impl, block_slots) case is compiled once, warmed up, then timed `--iters` times with
`jax.block_until_ready`; the JSON keeps every sample. On a device the Pallas output is also compared with
the reference once per case (bitwise for the gathers, allclose for the merge), because the kernels were
written without access to a GPU/TPU. A failing case is recorded with its error and the sweep continues.

On CPU only the reference is timed: Pallas runs there only in interpret mode, which measures nothing.

Kernels:
  gather_per_head: every (layer, row, kv head) keeps its own sorted random subset of out_slots (H2O/SnapKV).
  gather_shared:   one subset per (layer, row), shared by all kv heads (StreamingLLM/LaCache ladder).
  merge:           per-head runs of --merge_run_len consecutive slots, weighted (KVMerger-style).

Output: results/bench_kernels/<UTC timestamp>.json and a table on stdout.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
import traceback
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lacax import results as results_lib
from pallas_kernels import compaction
from pallas_kernels import merge

KERNELS = ("gather_per_head", "gather_shared", "merge")

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8"], "Batch sizes to time.")
_LAYERS = flags.DEFINE_integer("layers", 32, "Cache layers (Llama-3-8B: 32).")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads (Llama-3-8B: 8).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim (Llama-3-8B: 128).")
_SLOTS = flags.DEFINE_integer("slots", 4096, "Input cache slots.")
_OUT_SLOTS = flags.DEFINE_integer("out_slots", 2048, "Output cache slots.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Cache dtype.")
_KERNELS = flags.DEFINE_list("kernels", list(KERNELS), f"Subset of {KERNELS}.")
_IMPLS = flags.DEFINE_list("impls", ["reference", "pallas"], "Implementations (pallas is skipped on CPU).")
_BLOCK_SLOTS = flags.DEFINE_list("block_slots", [], "Pallas block_slots values to sweep; empty = default.")
_MERGE_RUN_LEN = flags.DEFINE_integer("merge_run_len", 2, "Length of every merge run (slots per output).")
_MAX_RUN = flags.DEFINE_integer("max_run", 4, "Static max_run passed to the merge (>= merge_run_len).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls; the median is reported.")
_CHECK = flags.DEFINE_boolean("check", True, "Compare each Pallas output with the reference once.")
_PEAK_GBPS = flags.DEFINE_float("peak_gbps", None, "HBM peak for the %-of-peak column; default: known table.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Root directory for results.")
_INTERPRET_ON_CPU = flags.DEFINE_boolean(
    "interpret_on_cpu", False, "Keep the Pallas impl on CPU, in interpret mode: a smoke test of this script "
    "with tiny shapes (e.g. --layers=1 --slots=64 --out_slots=24); its timings mean nothing.")

# Spec-sheet HBM bandwidth in GB/s, matched against `device_kind` (first match wins).
_KNOWN_PEAK_GBPS = (
    ("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0), ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0), ("TPU v5 lite", 819.0), ("TPU v5e", 819.0), ("TPU v5p", 2765.0), ("TPU v5", 2765.0),
    ("TPU v6", 1640.0), ("TPU v4", 1228.0),
)


def _peak_gbps(device_kind: str) -> float | None:
  if _PEAK_GBPS.value is not None:
    return _PEAK_GBPS.value
  for key, gbps in _KNOWN_PEAK_GBPS:
    if key.lower() in device_kind.lower():
      return gbps
  return None


def _sorted_subset(key: jax.Array, shape: tuple[int, ...], slots: int, out_slots: int) -> jax.Array:
  """int32 [*shape, out_slots]: a sorted random subset of range(slots) per leading index (kept slots)."""
  scores = jax.random.uniform(key, shape + (slots,))
  keep = jnp.argsort(scores, axis=-1)[..., :out_slots]
  return jnp.sort(keep, axis=-1).astype(jnp.int32)


def _make_case(kernel: str, batch: int, key: jax.Array) -> tuple[tuple[jax.Array, ...], dict[str, Any], int]:
  """Device arrays for one case, the kwargs shared by both impls, and the minimum HBM bytes moved."""
  layers, kv, d, s, s_out = _LAYERS.value, _KV_HEADS.value, _HEAD_DIM.value, _SLOTS.value, _OUT_SLOTS.value
  dtype = jnp.dtype(_DTYPE.value)
  kx, kp = jax.random.split(key)
  x = jax.random.normal(kx, (layers, batch, s, kv, d), dtype)
  row_bytes = kv * d * dtype.itemsize  # one slot, all heads
  lb = layers * batch
  if kernel == "gather_per_head":
    plan = jnp.moveaxis(_sorted_subset(kp, (layers, batch, kv), s, s_out), 2, 3)  # [L, B, S_out, KV]
    return (x, plan), {}, lb * (2 * s_out * row_bytes + s_out * kv * 4)
  if kernel == "gather_shared":
    plan = _sorted_subset(kp, (layers, batch), s, s_out)  # [L, B, S_out]
    return (x, plan), {}, lb * (2 * s_out * row_bytes + s_out * 4)
  if kernel == "merge":
    run = _MERGE_RUN_LEN.value
    if run * s_out > s or run > _MAX_RUN.value:
      raise ValueError(f"merge_run_len={run} needs run * out_slots <= slots and run <= max_run")
    start = jnp.broadcast_to((jnp.arange(s_out, dtype=jnp.int32) * run)[:, None], (layers, batch, s_out, kv))
    run_len = jnp.full((layers, batch, s_out, kv), run, jnp.int32)
    weight = jax.random.uniform(kp, (layers, batch, s, kv), jnp.float32)
    moved = lb * (s_out * run * row_bytes + s_out * row_bytes + s_out * run * kv * 4 + 2 * s_out * kv * 4)
    return (x, start, run_len, weight), {"max_run": _MAX_RUN.value}, moved
  raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def _fn(kernel: str, impl: str, block_slots: int | None, kwargs: dict[str, Any]) -> Callable[..., jax.Array]:
  if kernel.startswith("gather"):
    return functools.partial(compaction.gather, impl=impl, block_slots=block_slots)
  return functools.partial(merge.segment_merge, impl=impl, block_slots=block_slots, **kwargs)


def _time(fn: Callable[..., jax.Array], args: tuple[jax.Array, ...]) -> tuple[dict[str, Any], Any]:
  """Compiles once, warms up, times `--iters` calls; returns (timings, the compiled callable)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(_WARMUP.value):
    jax.block_until_ready(compiled(*args))
  samples = []
  for _ in range(_ITERS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    samples.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "samples_s": samples, "median_s": statistics.median(samples),
          "min_s": min(samples)}, compiled


def _compare(kernel: str, out: jax.Array, ref: jax.Array) -> dict[str, Any]:
  out32, ref32 = np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
  max_abs = float(np.max(np.abs(out32 - ref32))) if out32.size else 0.0
  if kernel.startswith("gather"):
    return {"matches_reference": bool(jnp.array_equal(out, ref)), "max_abs_err": max_abs}
  tol = 1e-2 if out.dtype == jnp.bfloat16 else 1e-5
  return {"matches_reference": bool(np.allclose(out32, ref32, rtol=tol, atol=tol)), "max_abs_err": max_abs}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for kernel in _KERNELS.value:
    if kernel not in KERNELS:
      raise app.UsageError(f"--kernels: {kernel!r} is not one of {KERNELS}")
  backend = jax.default_backend()
  device_kind = jax.devices()[0].device_kind
  peak = _peak_gbps(device_kind)
  impls = list(_IMPLS.value)
  notes = []
  if backend == "cpu" and "pallas" in impls and _INTERPRET_ON_CPU.value:
    notes.append("CPU backend with --interpret_on_cpu: Pallas timings are interpret-mode, not performance.")
  elif backend == "cpu" and "pallas" in impls:
    impls.remove("pallas")
    notes.append("CPU backend: timing the jax.numpy reference only (Pallas runs only in interpret mode on "
                 "CPU, which is not a performance measurement).")
  block_sweep = [int(b) for b in _BLOCK_SLOTS.value] or [None]

  rows = []
  key = jax.random.key(0)
  for kernel in _KERNELS.value:
    for batch in (int(b) for b in _BATCH_SIZES.value):
      try:
        args, kwargs, moved = _make_case(kernel, batch, key)
      except Exception as e:  # pylint: disable=broad-except - e.g. out of memory for the largest batch
        rows.append({"kernel": kernel, "batch": batch, "error": f"setup: {e!r}"})
        continue
      ref_out = None
      for impl in impls:
        for block_slots in (block_sweep if impl == "pallas" else [None]):
          row = {"kernel": kernel, "batch": batch, "impl": impl, "block_slots": block_slots,
                 "bytes_moved": moved}
          try:
            timing, compiled = _time(_fn(kernel, impl, block_slots, kwargs), args)
            row.update(timing)
            row["gbps"] = moved / timing["median_s"] / 1e9
            row["pct_of_peak"] = None if peak is None else 100.0 * row["gbps"] / peak
            if impl == "reference":
              ref_out = compiled(*args)
            elif _CHECK.value:
              if ref_out is None:
                ref_out = jax.jit(_fn(kernel, "reference", None, kwargs))(*args)
              row.update(_compare(kernel, compiled(*args), ref_out))
          except Exception as e:  # pylint: disable=broad-except - record and keep sweeping
            row["error"] = repr(e)
            row["traceback"] = traceback.format_exc(limit=8)
          rows.append(row)
          print(_format_row(row), flush=True)
      del args, ref_out

  out = {
      "device_kind": device_kind, "backend": backend, "peak_gbps": peak, "notes": notes,
      "shape": {"layers": _LAYERS.value, "kv_heads": _KV_HEADS.value, "head_dim": _HEAD_DIM.value,
                "slots": _SLOTS.value, "out_slots": _OUT_SLOTS.value, "dtype": _DTYPE.value,
                "merge_run_len": _MERGE_RUN_LEN.value, "max_run": _MAX_RUN.value},
      "warmup": _WARMUP.value, "iters": _ITERS.value, "rows": rows,
  }
  out.update(results_lib.provenance())
  path = results_lib.timestamped_path(os.path.join(_RESULTS_DIR.value, "bench_kernels"))
  results_lib.write_json(path, out)

  print()
  print(f"device: {device_kind} ({backend}); peak HBM: {peak or 'unknown'} GB/s")
  for note in notes:
    print(note)
  print(_HEADER)
  for row in rows:
    print(_format_row(row))
  print(f"results: {path}")


_HEADER = (f"{'kernel':<16} {'batch':>5} {'impl':<10} {'block':>5} {'median ms':>10} {'GB/s':>8} "
           f"{'% peak':>7} {'matches':>8}")


def _format_row(row: dict[str, Any]) -> str:
  head = f"{row['kernel']:<16} {row['batch']:>5} {row.get('impl', '-'):<10} {str(row.get('block_slots') or '-'):>5}"
  if "error" in row:
    return f"{head} ERROR {row['error'][:120]}"
  pct = "-" if row.get("pct_of_peak") is None else f"{row['pct_of_peak']:.1f}"
  match = row.get("matches_reference", "-")
  return f"{head} {1e3 * row['median_s']:>10.3f} {row['gbps']:>8.1f} {pct:>7} {str(match):>8}"


if __name__ == "__main__":
  app.run(main)
