"""Icarus Verilog: `iverilog` compile + `vvp -n` simulation in the sandbox, with VerilogEval's flags.

VerilogEval (NVlabs/verilog-eval, v1 `execution.py` and v2 `scripts/`) compiles with
`iverilog -Wall -Winfloop -Wno-timescale -g2012 -s tb` and runs `vvp -n` under a 30 s timeout. v1 passes a
sample only with an empty compiler stderr (any warning fails); v2 judges the `Mismatches:` line. Both are
offered (`strict_stderr`); the default is v2's.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from lacax.hw import sandbox
from lacax.hw import tools
from lacax.hw.tools import sim

VERILOGEVAL_FLAGS = ("-Wall", "-Winfloop", "-Wno-timescale", "-g2012")
DEFAULT_LIMITS = sandbox.Limits(wall_s=30.0)


def compile_cmd(files: Sequence[str], top: str | None = None, flags: Sequence[str] = VERILOGEVAL_FLAGS,
                output: str = "sim.vvp") -> list[str]:
  return ["iverilog", *flags, *(["-s", top] if top else []), "-o", output, *files]


def simulate(sources: Mapping[str, str], *, top: str | None = "tb", judge: str = "mismatches",
             flags: Sequence[str] = VERILOGEVAL_FLAGS, limits: sandbox.Limits = DEFAULT_LIMITS,
             data_files: Mapping[str, bytes | str] | None = None, strict_stderr: bool = False,
             box: sandbox.Box | None = None) -> sim.SimResult:
  """Compiles `sources` ({file name: text}, in order) and simulates `top`.

  Args:
    sources: the Verilog files (testbench, reference, design), compiled in this order.
    top: the top module (`-s`); None lets iverilog take every uninstantiated module as a root.
    judge: how the output is judged (`sim.JUDGES`).
    flags: compiler flags (default VerilogEval's).
    limits: sandbox limits of each step.
    data_files: extra files the testbench reads ($readmemh, $fopen), placed beside the sources.
    strict_stderr: VerilogEval v1's rule: any compiler message (a warning too) fails the sample.
    box: an open box to run in (its files stay); default a fresh one.

  Returns:
    A `sim.SimResult` (simulator "iverilog").
  """
  sim._check_files(sources)
  tools.require_tool("iverilog")
  sim.judge(judge, "")  # validates the name
  own = box is None
  box = box or sandbox.Box(limits)
  try:
    for name, text in sources.items():
      box.write(name, text)
    for name, data in (data_files or {}).items():
      box.write(name, data)
    comp = box.run(compile_cmd(list(sources), top, flags), limits=limits)
    if comp.returncode != 0 or comp.stopped_by is not None:
      category, detail = sim.classify_compile(comp)
      return sim.SimResult("iverilog", category, detail, None, comp, None, tools.versions())
    if strict_stderr and comp.stderr.strip():
      category, detail = sim.classify_compile(comp)
      return sim.SimResult("iverilog", category, "compiler message (strict_stderr): " + detail, None, comp, None,
                           tools.versions())
    res = box.run(["vvp", "-n", "sim.vvp"], limits=limits)
    verdict = sim.judge(judge, res.stdout)
    category, detail = sim.classify_run(res, verdict)
    return sim.SimResult("iverilog", category, detail, verdict, comp, res, tools.versions())
  finally:
    if own:
      box.close()


def compiles(sources: Mapping[str, str], *, top: str | None = None, flags: Sequence[str] = VERILOGEVAL_FLAGS,
             limits: sandbox.Limits = DEFAULT_LIMITS) -> tuple[bool, sandbox.RunResult]:
  """Whether `sources` compile (a syntax / elaboration check), with the compile step's result."""
  sim._check_files(sources)
  with sandbox.Box(limits, sources) as box:
    res = box.run(compile_cmd(list(sources), top, flags, output="check.vvp"))
  return res.ok, res
