"""One design point, evaluated for real: iverilog simulation of the GEMM workload, then yosys synthesis.

`evaluate(design, workload, overrides)`:

  1. checks the knobs (`template.problems`): an infeasible design is a failed evaluation, stage "validate";
  2. writes the accelerator (`template.generate`, model-written modules in `overrides` first go through
     `autofix.fix_loop`), simulates it against the self-checking testbench (golden product from numpy) in the
     sandbox; anything but a pass (syntax error, mismatch, timeout, ...) is a failed evaluation, stage "sim";
  3. synthesises it with yosys (cells, flip-flops, logic depth); a synthesis failure is stage "synth".

Only a design that passed simulation *and* synthesised has a fitness:

  fitness = -(log2(cycles) + area_weight * log2(cells))

(higher is better; area_weight = 1 ranks by the area-delay product cycles x cells). A failed design has fitness
None and is never reported as fit. `Evaluator` caches evaluations by design hash (`template.design_hash`: the
exact sources, knobs and workload), optionally in a `RunDir` (units `eval/<hash>`, so a resumed run re-uses them)
and in a shared cache directory (`cache_dir`, the same unit files) that other runs of the same workload read.
"""

from __future__ import annotations

import math
import re
import threading
import time
from typing import Any, Mapping

from lacax.hw.aigchip import autofix
from lacax.hw.aigchip import template
from lacax.hw.tools import iverilog, yosys

_CYCLES_RE = re.compile(r"CYCLES:\s*(\d+)")


# Where the template's PE comes from: lacax's Verilog, or its multiply-accumulate in DSLX through XLS
# (`lacax.hw.aigchip.hls`; the Evaluator then passes it as the `gemm_pe` override).
PE_SOURCES = ("verilog", "dslx")


def fitness_of(cycles: int, cells: int, area_weight: float) -> float:
  return -(math.log2(max(cycles, 1)) + area_weight * math.log2(max(cells, 1)))


def evaluate(design: template.Design, workload: template.Workload, overrides: Mapping[str, str] | None = None, *,
             synth: bool = True, area_weight: float = 1.0, fix: bool = True) -> dict[str, Any]:
  """The record of one evaluation (JSON-ready): "ok", "stage" of failure, "category", "cycles",
  "analytic_cycles", "cells", "flip_flops", "depth", "fitness" (None unless ok), "fixes", "hash", "wall_s"."""
  t0 = time.monotonic()
  rec: dict[str, Any] = {"design": design.to_json(), "ok": False, "stage": None, "category": None, "detail": "",
                         "cycles": None, "analytic_cycles": None, "cells": None, "flip_flops": None,
                         "depth": None, "fitness": None, "fixes": [], "overrides": sorted(overrides or {})}
  errs = template.problems(design, workload)
  if errs:
    rec.update(stage="validate", category="infeasible", detail="; ".join(errs), hash=None,
               wall_s=time.monotonic() - t0)
    return rec
  rec["analytic_cycles"] = template.analytic_cycles(design, workload)
  tb = template.testbench(design, workload)
  base = template.generate(design, workload)
  fixed: dict[str, str] = {}
  for name, code in (overrides or {}).items():
    if fix:
      context = {"tb.v": tb, **{f: t for f, t in base.items() if f != f"{name}.v"}}
      code, fixes, _, _ = autofix.fix_loop(code, name, context)
      rec["fixes"] += [{"module": name, **f} for f in autofix.fixes_json(fixes)]
    fixed[name] = code
  sources = template.generate(design, workload, fixed)
  rec["hash"] = template.design_hash(sources, design, workload)
  sim = iverilog.simulate({"tb.v": tb, **sources})
  rec["category"], rec["detail"] = sim.category, sim.detail
  m = _CYCLES_RE.search(sim.run.stdout) if sim.run is not None else None
  rec["cycles"] = int(m.group(1)) if m else None
  if not sim.passed or rec["cycles"] is None:
    rec.update(stage="sim", wall_s=time.monotonic() - t0)
    return rec
  if synth:
    syn = yosys.synthesize(sources, "gemm_accel")
    rec.update(cells=syn.cells, flip_flops=syn.flip_flops, depth=syn.depth)
    if not syn.ok:
      rec.update(stage="synth", category="synth_error", detail=syn.error, wall_s=time.monotonic() - t0)
      return rec
  rec["ok"] = True
  rec["fitness"] = fitness_of(rec["cycles"], rec["cells"] or 1, area_weight if synth else 0.0)
  rec["wall_s"] = time.monotonic() - t0
  return rec


class Evaluator:
  """`evaluate` with a cache by design hash (knobs + workload + overrides), in memory and in a RunDir."""

  def __init__(self, workload: template.Workload, *, synth: bool = True, area_weight: float = 1.0,
               run_dir: Any = None, cache_dir: str | None = None, pe: str = "verilog"):
    if pe not in PE_SOURCES:
      raise ValueError(f"pe={pe!r} must be one of {PE_SOURCES}")
    self.workload = workload
    self.pe = pe
    self.synth = synth
    self.area_weight = area_weight
    self.run_dir = run_dir
    self.cache_dir = cache_dir or None
    self.cache: dict[str, dict[str, Any]] = {}
    self.computed = 0  # evaluations actually simulated (cache misses)
    self._lock = threading.Lock()

  def key(self, design: template.Design, overrides: Mapping[str, str] | None = None) -> str:
    """The cache key: knobs + workload + the raw override text (before fixing; fixing is deterministic)."""
    import hashlib  # pylint: disable=g-import-not-at-top
    h = hashlib.sha256(design.key().encode() + repr(self.workload.to_json()).encode()
                       + repr((self.synth, self.area_weight, template.TEMPLATE_VERSION)).encode())
    for name in sorted(overrides or {}):
      h.update(name.encode() + b"\0" + overrides[name].encode())
    return h.hexdigest()[:20]

  def __call__(self, design: template.Design, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    if self.pe == "dslx" and "gemm_pe" not in (overrides or {}) and not template.problems(design, self.workload):
      from lacax.hw.aigchip import hls  # pylint: disable=g-import-not-at-top
      overrides = {**(overrides or {}), "gemm_pe": hls.pe_module(design, self.workload)}
    key = self.key(design, overrides)
    with self._lock:
      if key in self.cache:
        return dict(self.cache[key], cached=True)
    from lacax import runs  # pylint: disable=g-import-not-at-top
    unit = f"eval/{key}"
    stores = [runs.as_run_dir(d) for d in (self.run_dir, self.cache_dir) if d is not None]
    rec = next((r for r in (st.load_unit(unit) for st in stores) if r is not None), None)
    fresh = rec is None
    if fresh:
      rec = evaluate(design, self.workload, overrides, synth=self.synth, area_weight=self.area_weight)
    for st in stores:  # the run's own units (resume) and the shared store
      if not st.has_unit(unit):
        st.save_unit(unit, rec)
    if stores:
      rec = stores[0].load_unit(unit)  # as read back from JSON, whichever way it came
    with self._lock:
      self.computed += int(fresh)
      self.cache[key] = rec
    return dict(rec, cached=False)
