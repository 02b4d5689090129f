"""Offline reasoning traces for reflection: a draft with a realistic bug, a critique, and the correction.

ScaleRTL trains on long reasoning traces distilled from DeepSeek-R1; offline, lacax builds their shape from the
generated MG-Verilog tasks (`lacax.hw.mg_verilog.tasks`), whose reference designs are correct by construction:

  draft       the reference with one injected bug of a class RTL designers actually make (`BUGS`): reset
              polarity, blocking assignments in a clocked block, an output one bit too narrow, a missing case
              default, an asynchronous reset where the specification asks for a synchronous one;
  critique    what is wrong, in words tied to the rule it breaks (the cue's rules), and the simulator's verdict
              on the draft (its failure category and mismatch count, from the task's own testbench);
  correction  the reference design.

Every trace is verified by real simulation before it is kept: the draft must FAIL the testbench and the
correction must PASS it (a bug without an observable effect, e.g. a missing default of an unreachable state, is
dropped and counted). Records are `{"instruction", "input", "output"}` (what `lacax.train.instruction_dataset`
and the MG-Verilog fine-tuning read: the harness's own prompt, and an answer of draft -> "Wait, ..." ->
critique -> corrected design) plus the fields that document them (task, bug, verdicts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Sequence

from lacax.hw.bench.problem import render_prompt


def _clocked_blocks(code: str) -> list[tuple[int, int]]:
  """(start, end) of each `always @(posedge ...)` block's text."""
  spans = []
  for m in re.finditer(r"always\s*@\(\s*posedge[^)]*\)", code):
    end = code.find("\n  end", m.end())
    nxt = code.find("always", m.end())
    if end < 0:
      end = len(code)
    if 0 <= nxt < end:  # a one-statement block without begin/end
      end = nxt
    spans.append((m.end(), end))
  return spans


def bug_reset_polarity(code: str) -> str | None:
  if "if (reset)" not in code:
    return None
  return code.replace("if (reset)", "if (!reset)", 1)


def bug_blocking(code: str) -> str | None:
  """`<=` -> `=` for the register assignments (outside parentheses) of the clocked blocks, with two
  assignments of one `begin ... end` in the order that non-blocking assignment forgives and blocking does not
  (a register updated before another statement reads it)."""
  spans = _clocked_blocks(code)
  if not spans:
    return None
  out, last = [], 0
  for start, end in spans:
    out.append(code[last:start])
    depth, block, i = 0, code[start:end], 0
    text = []
    while i < len(block):
      ch = block[i]
      depth += ch == "("
      depth -= ch == ")"
      if block.startswith("<=", i) and depth == 0:
        text.append("=")
        i += 2
        continue
      text.append(ch)
      i += 1
    out.append(re.sub(r"begin ([^;]+;) ([^;]+;) end", r"begin \2 \1 end", "".join(text)))
    last = end
  out.append(code[last:])
  new = "".join(out)
  return new if new != code else None


def bug_width(code: str) -> str | None:
  """The first multi-bit output declared one bit narrower."""
  m = re.search(r"output(\s+reg)?\s*\[(\d+):0\]", code)
  if not m or int(m.group(2)) < 1:
    return None
  return code[:m.start(2)] + str(int(m.group(2)) - 1) + code[m.end(2):]


def bug_case_default(code: str) -> str | None:
  new = re.sub(r"\n[ \t]*default\s*:[^\n]*", "", code, count=1)
  return new if new != code else None


def bug_async_reset(code: str) -> str | None:
  if "reset" not in code or "posedge clk)" not in code:
    return None
  return code.replace("posedge clk)", "posedge clk or posedge reset)", 1)


BUGS: dict[str, Callable[[str], str | None]] = {
    "reset_polarity": bug_reset_polarity,
    "blocking_assignment": bug_blocking,
    "width_off_by_one": bug_width,
    "missing_case_default": bug_case_default,
    "async_reset": bug_async_reset,
}

CRITIQUES = {
    "reset_polarity": "The specification gives an active-high reset, but the draft tests `!reset`: it resets "
                      "while reset is 0 and ignores reset = 1. The condition must be `if (reset)`.",
    "blocking_assignment": "The clocked always block uses blocking assignments (=): a later statement then reads "
                           "the value a register takes at this clock edge instead of the value it held, which "
                           "changes the behaviour. Registers in a clocked block are assigned with <=.",
    "width_off_by_one": "An output is declared one bit narrower than the specification's port, so its top bit "
                        "is lost. The width must match the specification.",
    "missing_case_default": "The case statement has no default branch: for the values it does not list the "
                            "output keeps an old or unknown value instead of the one the specification gives.",
    "async_reset": "The reset is synchronous, but the draft puts posedge reset in the sensitivity list, so it "
                   "resets at once instead of at the next rising clock edge. A synchronous reset must not "
                   "appear in the sensitivity list.",
}


@dataclasses.dataclass(frozen=True)
class ReflectionTrace:
  task_id: str
  bug: str
  prompt: str
  draft: str
  critique: str
  correction: str
  draft_verdict: str
  correction_verdict: str

  def output(self) -> str:
    return (f"```verilog\n{self.draft.rstrip()}\n```\n\nWait, let me check the design against the "
            f"specification and the RTL rules.\n{self.critique}\nHere is the corrected design:\n```verilog\n"
            f"{self.correction.rstrip()}\n```")

  def record(self) -> dict[str, Any]:
    return {"instruction": self.prompt, "input": "", "output": self.output(), "task_id": self.task_id,
            "bug": self.bug, "draft": self.draft, "critique": self.critique, "correction": self.correction,
            "draft_verdict": self.draft_verdict, "correction_verdict": self.correction_verdict}


def build(tasks: Sequence[Any], level: str = "detailed", bugs: Sequence[str] = tuple(BUGS),
          simulator: str = "iverilog", workers: int | None = None) -> tuple[list[ReflectionTrace], dict[str, Any]]:
  """Every (task, applicable bug) trace whose draft fails and whose correction passes the task's testbench.

  Returns:
    (traces, stats: candidates, kept, dropped per reason, kept per bug).
  """
  from lacax.hw import sandbox  # pylint: disable=g-import-not-at-top
  from lacax.hw.bench import harness  # pylint: disable=g-import-not-at-top

  for b in bugs:
    if b not in BUGS:
      raise ValueError(f"bug={b!r} must be one of {sorted(BUGS)}")
  cands = []
  for t in tasks:
    prob = t.problem(level)
    for b in bugs:
      draft = BUGS[b](prob.reference)
      if draft is not None:
        cands.append((prob, b, draft))
  # Each reference is simulated once; each draft once.
  refs = {c[0].task_id: c[0] for c in cands}

  def sim(job):
    prob, code = job
    res = harness.simulate_design(prob, code, simulator)
    return f"{res.category}: {res.detail}".strip(": ") if res.category != "pass" else "pass"

  ref_ids = sorted(refs)
  verdicts = sandbox.parallel_map(sim, [(refs[i], refs[i].reference) for i in ref_ids] +
                                  [(p, d) for p, _, d in cands], workers)
  ref_verdict = dict(zip(ref_ids, verdicts[:len(ref_ids)]))
  kept, stats = [], {"candidates": len(cands), "dropped_draft_passes": 0, "dropped_reference_fails": 0}
  for (prob, b, draft), verdict in zip(cands, verdicts[len(ref_ids):]):
    if ref_verdict[prob.task_id] != "pass":
      stats["dropped_reference_fails"] += 1
      continue
    if verdict == "pass":
      stats["dropped_draft_passes"] += 1
      continue
    (user,) = render_prompt(prob, "chat", system="")
    critique = f"{CRITIQUES[b]} (Simulation of the draft: {verdict.splitlines()[0][:160]}.)"
    kept.append(ReflectionTrace(prob.task_id, b, user["content"], draft, critique, prob.reference, verdict,
                                ref_verdict[prob.task_id]))
  stats["kept"] = len(kept)
  stats["per_bug"] = {b: sum(t.bug == b for t in kept) for b in bugs}
  return kept, stats


def write_jsonl(path: str, traces: Sequence[ReflectionTrace]) -> str:
  """Writes the records as JSONL, atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for t in traces:
      f.write(json.dumps(t.record(), ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path
