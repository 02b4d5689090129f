"""Verilator as the second simulator: `--lint-only` checks and `--binary --timing` simulation, sandboxed.

Verilator 5 (`--binary --timing`) runs VerilogEval v2 testbenches, including the casts iverilog 11 rejects
(Prob151, Prob156), at the price of a C++ compile (seconds per design). Lint warnings are reported but not
fatal (`-Wno-fatal`), as a simulator fallback should be.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from lacax.hw import sandbox
from lacax.hw import tools
from lacax.hw.tools import sim

DEFAULT_LIMITS = sandbox.Limits(wall_s=180.0, processes=256)
_WARN_RE = re.compile(r"^%(Warning|Error)(?:-([A-Z0-9_]+))?: (.*)$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class LintResult:
  """`verilator --lint-only`: clean iff no error (warnings are listed as (code, message))."""

  ok: bool
  errors: tuple[tuple[str, str], ...]
  warnings: tuple[tuple[str, str], ...]
  run: sandbox.RunResult


def lint(sources: Mapping[str, str], *, top: str | None = None, all_warnings: bool = True,
         limits: sandbox.Limits = sandbox.Limits(wall_s=60.0)) -> LintResult:
  sim._check_files(sources)
  tools.require_tool("verilator")
  cmd = ["verilator", "--lint-only", *(["-Wall"] if all_warnings else []), "-Wno-fatal", "--timing",
         *(["--top-module", top] if top else []), *sources]
  with sandbox.Box(limits, sources) as box:
    res = box.run(cmd)
  errors, warnings = [], []
  for kind, code, msg in _WARN_RE.findall(res.stderr):
    (errors if kind == "Error" else warnings).append((code or "", msg.strip()))
  return LintResult(res.returncode == 0 and not errors, tuple(errors), tuple(warnings), res)


def simulate(sources: Mapping[str, str], *, top: str | None = "tb", judge: str = "mismatches",
             limits: sandbox.Limits = DEFAULT_LIMITS, data_files: Mapping[str, bytes | str] | None = None,
             extra_flags: Sequence[str] = ()) -> sim.SimResult:
  """Builds `sources` with `verilator --binary --timing` and runs the binary (same arguments as iverilog's)."""
  sim._check_files(sources)
  tools.require_tool("verilator")
  sim.judge(judge, "")
  cmd = ["verilator", "--binary", "--timing", "-j", "1", "-Wno-fatal", "-Wno-lint", "-Wno-style",
         "-Wno-TIMESCALEMOD", "-Wno-MULTIDRIVEN", "-Mdir", "obj", "-o", "sim",
         *(["--top-module", top] if top else []), *extra_flags, *sources]
  with sandbox.Box(limits, sources) as box:
    for name, data in (data_files or {}).items():
      box.write(name, data)
    comp = box.run(cmd)
    if comp.returncode != 0 or comp.stopped_by is not None:
      errors = "\n".join(l for l in comp.stderr.splitlines() if l.startswith("%Error")) or comp.stderr
      category, detail = sim.classify_compile(comp, errors)
      return sim.SimResult("verilator", category, detail, None, comp, None, tools.versions())
    res = box.run(["./obj/sim"])
    verdict = sim.judge(judge, res.stdout)
    category, detail = sim.classify_run(res, verdict)
    return sim.SimResult("verilator", category, detail, verdict, comp, res, tools.versions())
