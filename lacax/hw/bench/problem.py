"""One benchmark problem, whatever the benchmark: what to ask, how to assemble an answer, how to check it.

A `Problem` holds the description a model is given, the module it must write (`top`), the interface (module
header), the testbench files, how the testbench's output is judged, the reference solution (what the oracle
answers), data files the testbench reads, and known issues (benchmark bugs, simulator limits) with reasons.
Loaders (`verilog_eval`, `rtllm`, `logikbench`, and `lacax.hw.mg_verilog.tasks` for generated tasks) all
produce Problems; `lacax.hw.bench.harness` evaluates any of them with any backend and either simulator.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

ANSWER_MODES = ("module", "body")

_FENCE_RE = re.compile(r"```[ \t]*(?:verilog|systemverilog|sv|v)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_BEGIN_END_RE = re.compile(r"\[BEGIN\](.*?)(?:\[END\]|\Z)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Problem:
  """A problem of a hardware-design benchmark.

  Attributes:
    task_id: unique within the benchmark (e.g. "Prob001_zero").
    benchmark: e.g. "verilog_eval_v2/spec-to-rtl", "rtllm_v2", "logikbench", "mg_synthetic".
    description: the natural-language specification given to the model.
    top: the module name the answer must define.
    interface: the module header (`module top (...);`), for code completion and prompts.
    answer_mode: "module" (the answer is a whole module) or "body" (it completes `interface`).
    testbench: {file name: text}, compiled before the design (testbench + reference model).
    design_file: the file name the answer is written to.
    sim_top: the simulation's top module (None: every uninstantiated module).
    judge: "mismatches" or "pass_marker" (`lacax.hw.tools.sim.JUDGES`).
    reference: a correct design (whole module(s), `top` defined), the oracle's answer.
    data_files: {file name: bytes} the testbench reads ($readmemh, $fopen).
    known_issues: {simulator or "*": reason} for items known not to pass with a correct design.
    meta: anything else (levels, template family, category, source path).
  """

  task_id: str
  benchmark: str
  description: str
  top: str
  interface: str
  testbench: Mapping[str, str]
  reference: str
  answer_mode: str = "module"
  design_file: str = "design.sv"
  sim_top: str | None = "tb"
  judge: str = "mismatches"
  data_files: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
  known_issues: Mapping[str, str] = dataclasses.field(default_factory=dict)
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.answer_mode not in ANSWER_MODES:
      raise ValueError(f"problem {self.task_id}: answer_mode={self.answer_mode!r} must be one of {ANSWER_MODES}")
    if self.judge not in ("mismatches", "pass_marker"):
      raise ValueError(f"problem {self.task_id}: judge={self.judge!r} must be 'mismatches' or 'pass_marker'")
    if not re.fullmatch(r"[A-Za-z_]\w*", self.top):
      raise ValueError(f"problem {self.task_id}: top={self.top!r} must be a Verilog identifier")
    if self.design_file in self.testbench:
      raise ValueError(f"problem {self.task_id}: design_file={self.design_file!r} collides with a testbench file")

  def known_issue(self, simulator: str) -> str | None:
    return self.known_issues.get(simulator) or self.known_issues.get("*")

  def reference_answer(self) -> str:
    """What a perfect model answers: the whole reference module, or its body in "body" mode."""
    if self.answer_mode == "module":
      return self.reference
    return module_body(self.reference, self.top)

  def sources(self, design: str) -> dict[str, str]:
    """The files to compile, in order: testbench files, then the design."""
    return {**self.testbench, self.design_file: design}

  def to_json(self) -> dict[str, Any]:
    return {"task_id": self.task_id, "benchmark": self.benchmark, "top": self.top,
            "known_issues": dict(self.known_issues), "meta": dict(self.meta)}


def module_body(text: str, top: str) -> str:
  """The text after module `top`'s header (`module top ... );`), up to and including its `endmodule`."""
  m = re.search(rf"\bmodule\s+{re.escape(top)}\b", text)
  if not m:
    raise ValueError(f"no module {top!r} in the reference")
  depth, i = 0, m.end()
  while i < len(text):  # the header ends at the ';' after the balanced port list
    ch = text[i]
    if ch == "(":
      depth += 1
    elif ch == ")":
      depth -= 1
    elif ch == ";" and depth == 0:
      break
    i += 1
  return text[i + 1:].lstrip("\n")


def rename_module(text: str, old: str, new: str) -> str:
  """Renames module `old` to `new` (declaration and instantiations)."""
  return re.sub(rf"\b{re.escape(old)}\b", new, text)


def extract_code(text: str) -> str:
  """The Verilog in a model's answer: the fenced block(s) or [BEGIN]..[END] if present, else the text."""
  blocks = _FENCE_RE.findall(text)
  if blocks:
    with_module = [b for b in blocks if re.search(r"\bmodule\b", b)]
    return "\n".join(with_module or blocks).strip() + "\n"
  m = _BEGIN_END_RE.search(text)
  if m:
    return m.group(1).strip() + "\n"
  return text


def assemble(problem: Problem, answer: str) -> str:
  """The design file for `answer`: extracted code; in "body" mode prefixed with the interface unless the
  answer defines the module itself; cut after the last `endmodule` (models run on), or closed with one when
  generation stopped at an "endmodule" stop string (which backends cut from the text)."""
  code = extract_code(answer)
  if problem.answer_mode == "body" and not re.search(rf"\bmodule\s+{re.escape(problem.top)}\b", code):
    code = problem.interface.rstrip() + "\n" + code
  ends = [m.end() for m in re.finditer(r"\bendmodule\b", code)]
  if ends:
    code = code[:ends[-1]] + "\n"
  elif re.search(r"\bmodule\b", code):  # generation stopped at the "endmodule" stop string, which is cut
    code = code.rstrip() + "\nendmodule\n"
  return code


PROMPT_STYLES = ("chat", "raw")


def render_prompt(problem: Problem, style: str = "chat", system: str | None = None):
  """The prompt a backend gets for `problem`.

  "chat": [system, user] messages (just [user] when `system` is ""): the description, then the instruction to answer with module `top` (or its
  body after the given interface) in a ```verilog block (the VerilogEval v2 spec-to-rtl setup, with a fence
  instead of [BEGIN]/[END]). "raw": text to continue, for base models: the description as Verilog comments,
  then the interface, so the continuation is the module body.
  """
  if style == "chat":
    sys_text = system if system is not None else problem.meta.get(
        "system", "You are a Verilog RTL designer that only writes code using correct Verilog syntax.")
    if problem.answer_mode == "body":
      ask = (f"\n\nComplete the module below. Answer with the whole module {problem.top} in one ```verilog "
             f"block.\n\n{problem.interface}\n")
    else:
      ask = f"\n\nAnswer with the complete Verilog module {problem.top} in one ```verilog block."
    user = {"role": "user", "content": problem.description + ask}
    return ({"role": "system", "content": sys_text}, user) if sys_text else (user,)
  if style == "raw":
    comment = "\n".join("// " + line if line.strip() else "//" for line in problem.description.splitlines())
    return f"{comment}\n\n{problem.interface.rstrip()}\n"
  raise ValueError(f"prompt style={style!r} must be one of {PROMPT_STYLES}")
