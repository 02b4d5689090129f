"""GPT4AIGChip's demo ablations (Tables II-IV of arXiv 2309.10730): which demos, and how many, help the backend
write a template module.

For each (selector, number of demos, target module) the backend writes `n` samples of the template's `gemm_pe`
from the demo-augmented prompt; each sample is scored three ways, all with real tools in the sandbox:

  compile      the extracted code compiles with the rest of the template (the paper's pass@k: "compiles")
  functional   the accelerator with that PE passes the GEMM testbench, as written
  fixed        the same after the auto-fixer (`autofix.fix_loop`)

pass@k is the unbiased estimator of `lacax.hw.bench.passk`. The targets are the output-stationary PE (the
paper's ablation task) and the weight-stationary one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from lacax.hw.aigchip import autofix
from lacax.hw.aigchip import demos as demos_lib
from lacax.hw.aigchip import search
from lacax.hw.aigchip import template
from lacax.hw.backends import base
from lacax.hw.bench import passk
from lacax.hw.tools import iverilog

TARGETS = {"os": template.Design(dataflow="os"), "ws": template.Design(dataflow="ws", interconnect="systolic")}


def target_design(target: str, workload: template.Workload) -> template.Design:
  """The design whose PE the backend writes for `target`, its buffers deepened (if need be) to hold the
  workload's operands; a workload the target's array cannot run is a ValueError naming both."""
  if target not in TARGETS:
    raise ValueError(f"ablation target={target!r} must be one of {sorted(TARGETS)}")
  design = TARGETS[target]
  need = max(workload.m * workload.k, workload.k * workload.n, workload.m * workload.n)
  depth = next((x for x in template.SPACE["buf_depth"] if design.banks * x >= need), design.buf_depth)
  design = dataclasses.replace(design, buf_depth=max(design.buf_depth, depth))
  errs = template.problems(design, workload)
  if errs:
    raise ValueError(f"ablation target {target!r} ({design.to_json()}) cannot run workload {workload.to_json()}: "
                     + "; ".join(errs))
  return design


def score_sample(answer: str, design: template.Design, workload: template.Workload) -> dict[str, Any]:
  tb = template.testbench(design, workload)
  context = {"tb.v": tb, **{f: t for f, t in template.generate(design, workload).items() if f != "gemm_pe.v"}}
  code, _ = autofix.extract(answer)
  compiled, _ = iverilog.compiles({**context, "gemm_pe.v": code}, top="tb")
  functional = compiled and iverilog.simulate({**context, "gemm_pe.v": code}).passed
  fixed_code, fixes, fixed_compiles, _ = autofix.fix_loop(answer, "gemm_pe", context)
  fixed = functional or (fixed_compiles and iverilog.simulate({**context, "gemm_pe.v": fixed_code}).passed)
  return {"compile": bool(compiled), "functional": bool(functional), "fixed": bool(fixed),
          "fixes": [f.rule for f in fixes]}


def run_cell(backend: Any, selector: str, k: int, target: str, workload: template.Workload,
             library: Sequence[demos_lib.Demo], sampling: base.Sampling, seed: int = 0) -> dict[str, Any]:
  """One ablation cell: `sampling.n` samples for (selector, k demos, target)."""
  design = target_design(target, workload)
  instruction = search.pe_instruction(design)
  chosen, info = demos_lib.select(selector, instruction, library, k, backend=backend, seed=seed)
  prompt = demos_lib.build_prompt(instruction, chosen, interface=search.pe_interface(design))
  answers = [c.text for c in backend.generate([prompt], dataclasses.replace(sampling, seed=seed))[0]]
  scores = [score_sample(a, design, workload) for a in answers]
  n = len(scores)
  out = {"selector": selector, "k": k, "target": target, "demos": info.get("ids", []), "n": n}
  for what in ("compile", "functional", "fixed"):
    c = sum(s[what] for s in scores)
    out[f"{what}_c"] = c
    for kk in (1, 5, 10):
      if kk <= n:
        out[f"{what}@{kk}"] = passk.pass_at_k(n, c, kk)
  out["fix_rules"] = sorted({r for s in scores for r in s["fixes"]})
  out["answers"] = [a[:400] for a in answers]
  return out
