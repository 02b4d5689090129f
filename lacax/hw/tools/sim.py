"""Simulation results and lacax's failure taxonomy, shared by the simulators (`iverilog`, `verilator`).

A simulation is two sandboxed steps, compile then run; its outcome is one `SimResult` whose `category` is one
of CATEGORIES, refined by `detail`:

  pass               the testbench's verdict is a pass
  syntax_error       the compiler rejected the text (details: the parser's first message)
  elaboration_error  it parsed but did not elaborate. Details follow VerilogEval v2's `sv-iv-analyze` labels
                     (NVlabs/verilog-eval, scripts/): unknown_module (m), binding (p / c: ports or
                     signals that do not exist), reg_wire (w: a net driven the wrong way), cast (e),
                     zero_width (0), no_sensitivity (n), other (C)
  timeout            compile or run passed the wall-clock / CPU limit, or the testbench's own watchdog fired
                     ("TIMEOUT", VerilogEval's 1M-time-unit guard, with no verdict after it: testbenches
                     such as Prob082_lfsr32 legitimately run up to the guard and then report 0 mismatches) (T)
  resource_limit     the run was stopped by the output, memory or file-size limit of the sandbox
  runtime_error      the simulator failed while running ($fatal, a crash) or the testbench never gave a
                     verdict (R)
  mismatch           the testbench compared and found differences; `detail` names the outputs that differ

Verdicts: "mismatches" (VerilogEval: `Mismatches: N in M samples`, pass iff N == 0 and M > 0) or
"pass_marker" (RTLLM, logikbench: a line saying "pass" and no line saying fail / error other than a zero
count or a PASS line, which avoids the false passes of RTLLM's `auto_run.py`, e.g. ring_counter's testbench
printing "Passed" after its "Failed at" lines).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from lacax.hw import sandbox

CATEGORIES = ("pass", "syntax_error", "elaboration_error", "timeout", "resource_limit", "runtime_error",
              "mismatch")
JUDGES = ("mismatches", "pass_marker")

_MISMATCH_RE = re.compile(r"Mismatches:\s*(\d+)\s+in\s+(\d+)\s+samples")
_OUTPUT_HINT_RE = re.compile(r"Hint: Output '([^']+)' has (\d+) mismatches")
_PASS_RE = re.compile(r"pass", re.IGNORECASE)
_FAIL_RE = re.compile(r"fail|error", re.IGNORECASE)
# A line that reports zero failures ("completed with 0 /100 failures", "errors = 0", "0 errors") or is itself
# a pass ("PASS [a5] single-error corrected", logikbench) is not a failure line.
_ZERO_FAILS_RE = re.compile(r"\b(0+|zero|no)\s*(/\s*\d+\s*)?(errors?|failures?|fails?|mismatch(es)?)\b"
                            r"|\b(errors?|failures?|fails?|mismatch(es)?)\s*[:=]\s*0+\b|^\s*pass(ed)?\b",
                            re.IGNORECASE)

_ELAB_DETAILS = (  # first match wins; (pattern over the compiler's messages, detail)
    (re.compile(r"[Uu]nknown module type|Cannot find file containing module|Can't resolve module"),
     "unknown_module"),
    (re.compile(r"sorry: .*cast|[Cc]ast.*not supported|cast to"), "cast"),
    (re.compile(r"[Zz]ero[- ]width|0 width|zero replication"), "zero_width"),
    (re.compile(r"found no sensitivities|no sensitivities"), "no_sensitivity"),
    (re.compile(r"is not a valid l-value|cannot be driven by|Unable to assign to|reg .* may not be driven"
                r"|PROCASSWIRE|continuous assignment to"), "reg_wire"),
    (re.compile(r"is not a port|port .* not found|Unable to bind|[Nn]o such port|PINNOTFOUND|Can't find definition"
                r"|not declared|Cannot find|Unknown identifier"), "binding"),
)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What the testbench said: passed (None when it gave no verdict), mismatch counts, differing outputs."""

  passed: bool | None
  mismatches: int | None = None
  samples: int | None = None
  outputs: tuple[str, ...] = ()
  watchdog: bool = False


def judge_mismatches(stdout: str) -> Verdict:
  """VerilogEval's verdict: the last `Mismatches: N in M samples` line; pass iff N == 0 and M > 0."""
  found = _MISMATCH_RE.findall(stdout)
  watchdog = bool(re.search(r"^\s*TIMEOUT\s*$", stdout, re.MULTILINE))
  if not found:
    return Verdict(None, watchdog=watchdog)
  n, m = int(found[-1][0]), int(found[-1][1])
  outputs = tuple(name for name, count in _OUTPUT_HINT_RE.findall(stdout) if int(count) > 0)
  return Verdict(n == 0 and m > 0, n, m, outputs, watchdog)


def judge_pass_marker(stdout: str) -> Verdict:
  """RTLLM's verdict, made strict: a pass line and no fail / error line (a 0-failure summary is not one)."""
  lines = stdout.splitlines()
  fails = [l for l in lines if _FAIL_RE.search(l) and not _ZERO_FAILS_RE.search(l)]
  passes = [l for l in lines if _PASS_RE.search(l)]
  if fails:
    return Verdict(False, mismatches=len(fails))
  if passes:
    return Verdict(True, mismatches=0)
  return Verdict(None)


def judge(kind: str, stdout: str) -> Verdict:
  if kind == "mismatches":
    return judge_mismatches(stdout)
  if kind == "pass_marker":
    return judge_pass_marker(stdout)
  raise ValueError(f"judge={kind!r} must be one of {JUDGES}")


@dataclasses.dataclass(frozen=True)
class SimResult:
  """The outcome of compiling and running one design + testbench.

  Attributes:
    simulator: "iverilog" or "verilator".
    category: one of CATEGORIES.
    detail: the refinement of the category (see the module docstring), or the first compiler message.
    verdict: the testbench's verdict (None when the run never happened).
    compile: the sandboxed compile step; run: the simulation step (None when compilation failed).
    versions: the tool versions (`lacax.hw.tools.versions()`).
  """

  simulator: str
  category: str
  detail: str
  verdict: Verdict | None
  compile: sandbox.RunResult
  run: sandbox.RunResult | None
  versions: Mapping[str, str | None]

  @property
  def passed(self) -> bool:
    return self.category == "pass"

  def to_json(self, max_chars: int = 2000) -> dict[str, Any]:
    return {"simulator": self.simulator, "category": self.category, "detail": self.detail,
            "verdict": dataclasses.asdict(self.verdict) if self.verdict else None,
            "compile": self.compile.to_json(max_chars), "run": self.run.to_json(max_chars) if self.run else None,
            "versions": dict(self.versions)}


def _first_error(text: str) -> str:
  for line in text.splitlines():
    if re.search(r"error|sorry|Error", line):
      return line.strip()[:300]
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return lines[0][:300] if lines else ""


def classify_compile(res: sandbox.RunResult, messages: str | None = None) -> tuple[str, str]:
  """(category, detail) of a failed compile step."""
  if res.stopped_by in ("wall_time", "cpu_time"):
    return "timeout", f"compile {res.stopped_by}"
  if res.stopped_by is not None:
    return "resource_limit", f"compile {res.stopped_by}"
  text = messages if messages is not None else res.stderr + "\n" + res.stdout
  if re.search(r"syntax error|Syntax error|syntax-error|Unsupported: .*syntax|I give up", text):
    return "syntax_error", _first_error(text)
  for pattern, detail in _ELAB_DETAILS:
    if pattern.search(text):
      return "elaboration_error", detail
  return "elaboration_error", "other: " + _first_error(text)


def classify_run(res: sandbox.RunResult, verdict: Verdict) -> tuple[str, str]:
  """(category, detail) of a simulation that compiled."""
  if res.stopped_by in ("wall_time", "cpu_time"):
    return "timeout", res.stopped_by
  if res.stopped_by is not None:
    return "resource_limit", res.stopped_by
  if verdict.passed is None:
    if verdict.watchdog:  # VerilogEval's guard fired and no verdict followed (a full-length run still counts)
      return "timeout", "testbench watchdog (TIMEOUT) without a verdict"
    if res.returncode != 0:
      return "runtime_error", f"exit {res.returncode}: {_first_error(res.stderr + res.stdout)}"
    return "runtime_error", "no verdict from the testbench"
  if verdict.passed:
    return "pass", ""
  if verdict.samples == 0:
    return "runtime_error", "the testbench compared no samples" + (f" (exit {res.returncode})" if res.returncode else "")
  if res.returncode != 0:
    return "runtime_error", f"exit {res.returncode}: {_first_error(res.stderr + res.stdout)}"
  if verdict.mismatches is not None and verdict.samples is not None:
    outs = f" (outputs: {', '.join(verdict.outputs)})" if verdict.outputs else ""
    return "mismatch", f"{verdict.mismatches} of {verdict.samples} samples{outs}"
  return "mismatch", f"{verdict.mismatches} failing line(s)"


def _check_files(sources: Mapping[str, str]):
  if not sources:
    raise ValueError("sources is empty: give {file name: Verilog text}")
  for name, text in sources.items():
    if not isinstance(text, str):
      raise TypeError(f"sources[{name!r}] must be text, got {type(text).__name__}")
