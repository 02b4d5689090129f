"""The Spec2RTL-Agent orchestrator (arXiv 2506.13905): understanding, progressive coding, adaptive reflection.

`Agent(backend, ...).run(spec)` turns one specification document into verified RTL through role prompts over any
`lacax.hw.backends` backend:

Module 1 (understanding). The Summarizer states what the design computes; the Decomposer answers a JSON list of
  sub-functions in dependency order, each an info dict {name, function, inputs, output, plan, depends,
  examples}; the plan is checked for structure (identifiers, widths 1..64, dependencies on earlier entries only,
  the last entry being the spec's top function with the spec's interface), the Describer explains each entry,
  and the Verifier judges the plan against the spec (PASS / FAIL). Structural problems and FAIL reasons go back
  to the Decomposer, up to `budgets.plan_rounds` rounds.

Module 2 (progressive coding). Per sub-function, in order: pseudocode -> Python -> C++ -> HLS form (DSLX), each
  answer verified by running it (`lacax.hw.spec2rtl.execute`): pseudocode structurally (it cannot run: it must
  be non-empty and name the function and its arguments), Python in the sandbox against known answers, C++ with
  g++ against the Python golden model's outputs, DSLX interpreted by XLS against the same. A failed attempt
  sends the stage's coding instructions and the error to the prompt optimiser, whose rewrite is used from then
  on (for every later sub-function too); `budgets.attempts` attempts per stage. When every sub-function is
  done, XLS generates Verilog from the top DSLX function, iverilog co-simulates it against the golden vectors
  and yosys synthesises it (the "rtl" stage).

Module 3 (adaptive reflection). A stage that exhausts its attempts goes to the error analyser, which answers
  {"path": 1-4, "target": ..., "reason": ...}; the router then takes path
    1  revise the Module-1 instructions (the spec was misunderstood): understanding again, with the analysis as
       feedback, then all coding again;
    2  regenerate an earlier sub-function (`target`): it and every later one are coded again from pseudocode;
    3  retry the current sub-function from the failing stage, with the analysis as feedback;
    4  escalate to a human.
  A path-2 target that is not an earlier sub-function is taken as path 3, an unparsable analysis too (both
  recorded). Human interventions are counted as the paper counts them: every path 4, and every failure after
  the reflection budget (`budgets.reflections` per spec) or the plan budget is spent. A `Human` then supplies
  the stage's output (`ReferenceHuman`: the shipped reference stage output, standing in for an engineer), and
  the run continues; with `NoHuman`, or without a reference, the run stops unresolved.

C++-to-HLS is replaced by DSLX/XLS: no C++ HLS tool (Stratus, Catapult, Vitis, Bambu) installs offline, and
`xls-python` has no C++ front end, so the HLS form is DSLX and the C++ stays the executable model it is checked
against.
"""

from __future__ import annotations

import dataclasses
import keyword
import re
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

from lacax.hw.backends.base import Backend, Sampling
from lacax.hw.spec2rtl import execute
from lacax.hw.spec2rtl import reference
from lacax.hw.spec2rtl import roles
from lacax.hw.spec2rtl.spec import Spec

ALL_STAGES = ("understanding",) + roles.STAGES + ("rtl",)
PATHS = {1: "revise_understanding", 2: "regenerate_earlier", 3: "retry_current", 4: "escalate_human"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = set(keyword.kwlist) | {
    "fn", "let", "match", "for", "in", "if", "else", "pub", "const", "struct", "enum", "type", "proc", "import",
    "main", "int", "char", "long", "short", "unsigned", "signed", "void", "return", "switch", "case", "default",
    "input", "output", "wire", "reg", "module", "begin", "end"}


@dataclasses.dataclass(frozen=True)
class Budgets:
  """plan_rounds: Module-1 rounds; attempts: tries per stage (between reflections); reflections: per spec;
  vectors: random input vectors per sub-function (plus edges and known answers); max_calls: backend calls per
  spec before the run is stopped as unresolved (a guard, never reached with the other budgets)."""

  plan_rounds: int = 3
  attempts: int = 2
  reflections: int = 6
  vectors: int = 24
  max_calls: int = 400

  def __post_init__(self):
    for name in ("plan_rounds", "attempts", "vectors", "max_calls"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"budgets.{name}={getattr(self, name)!r} must be an integer >= 1")
    if not isinstance(self.reflections, int) or self.reflections < 0:
      raise ValueError(f"budgets.reflections={self.reflections!r} must be an integer >= 0")


class Human(Protocol):
  """Who answers an escalation. Returns the plan (stage "understanding") or the stage's code, or None."""

  name: str

  def plan(self, spec: Spec) -> dict[str, Any] | None:
    ...

  def fix(self, spec: Spec, subfunction: str, stage: str) -> str | None:
    ...


class ReferenceHuman:
  """An engineer who writes the shipped reference stage output (plan, pseudocode, Python, C++, DSLX)."""

  name = "reference"

  def plan(self, spec):
    ref = reference.load(spec)
    return None if ref is None else ref.plan

  def fix(self, spec, subfunction, stage):
    ref = reference.load(spec)
    return None if ref is None else ref.code.get((subfunction, stage))


class NoHuman:
  """Nobody answers: an escalation ends the run unresolved (it is still counted)."""

  name = "none"

  def plan(self, spec):
    return None

  def fix(self, spec, subfunction, stage):
    return None


HUMANS = {"reference": ReferenceHuman, "none": NoHuman}


@dataclasses.dataclass
class SpecRun:
  """What happened on one spec: the verdict, interventions, reflections, every event, the final code."""

  spec: str
  passed: bool = False
  unresolved: str = ""
  interventions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  reflections: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  optimisations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  trace: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  calls: int = 0
  plan: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  code: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
  rtl: dict[str, Any] = dataclasses.field(default_factory=dict)
  verilog: str = ""
  seconds: float = 0.0

  def interventions_by_stage(self) -> dict[str, int]:
    out = {s: 0 for s in ALL_STAGES}
    for i in self.interventions:
      out[i["stage"]] += 1
    return out

  def tools_used(self) -> list[str]:
    return sorted({t for e in self.trace if e.get("tool") for t in e["tool"].split(",")})

  def to_json(self) -> dict[str, Any]:
    return {"spec": self.spec, "passed": self.passed, "unresolved": self.unresolved,
            "interventions": len(self.interventions), "interventions_by_stage": self.interventions_by_stage(),
            "intervention_log": self.interventions, "reflections": self.reflections,
            "reflections_by_path": {str(p): sum(r["path"] == p for r in self.reflections) for p in PATHS},
            "optimisations": len(self.optimisations), "backend_calls": self.calls, "rtl": self.rtl,
            "tools_used": self.tools_used(), "plan": self.plan, "code": self.code, "verilog": self.verilog,
            "trace": self.trace, "seconds": self.seconds}


class _Stop(Exception):
  """The run cannot continue (unresolved)."""


class Agent:
  """The orchestrator (see the module docstring).

  Args:
    backend: any `lacax.hw.backends` backend (chat prompts).
    sampling: how each role's answer is drawn (n is forced to 1).
    budgets: the budgets.
    human: who answers escalations (`ReferenceHuman`, `NoHuman`, or your own).
    synthesize: run yosys on the final RTL.
    log: called with one line per event (progress).
  """

  def __init__(self, backend: Backend, sampling: Sampling = Sampling(max_tokens=768), budgets: Budgets = Budgets(),
               human: Human | None = None, synthesize: bool = True, log: Callable[[str], None] | None = None):
    self.backend = backend
    self.sampling = dataclasses.replace(sampling, n=1)
    self.budgets = budgets
    self.human = human if human is not None else ReferenceHuman()
    self.synthesize = synthesize
    self.log = log or (lambda m: None)

  # --- plumbing --------------------------------------------------------------------------------------------------

  def _ask(self, run: SpecRun, role: str, body: str, spec: Spec, sub: str | None = None, stage: str | None = None,
           attempt: int = 0) -> str:
    if run.calls >= self.budgets.max_calls:
      raise _Stop(f"budgets.max_calls={self.budgets.max_calls} backend calls spent")
    run.calls += 1
    prompt = roles.chat(role, roles.tag(role, spec.name, sub, stage, attempt), body)
    start = time.monotonic()
    text = self.backend.generate([prompt], self.sampling)[0][0].text
    run.trace.append({"event": "call", "role": role, "subfunction": sub, "stage": stage, "attempt": attempt,
                      "chars": len(text), "seconds": round(time.monotonic() - start, 3)})
    return text

  def _intervene(self, run: SpecRun, spec: Spec, stage: str, sub: str | None, reason: str, error: str):
    run.interventions.append({"stage": stage, "subfunction": sub, "reason": reason, "error": error[:500],
                              "human": self.human.name})
    run.trace.append({"event": "intervention", "stage": stage, "subfunction": sub, "reason": reason})
    self.log(f"{spec.name}: human intervention #{len(run.interventions)} at {stage}"
             f"{'/' + sub if sub else ''} ({reason})")

  # --- Module 1 --------------------------------------------------------------------------------------------------

  def check_plan(self, spec: Spec, plan: Any) -> list[str]:
    """Structural problems of a decomposition (an empty list when it is usable)."""
    if not isinstance(plan, list) or not plan:
      return ["the answer must contain a non-empty JSON list of sub-function info dicts"]
    problems, names = [], []
    for i, sub in enumerate(plan):
      where = f"sub-function {i}"
      if not isinstance(sub, dict):
        problems.append(f"{where} must be a JSON object")
        continue
      name = sub.get("name")
      if not isinstance(name, str) or not _IDENT.match(name) or name in _RESERVED:
        problems.append(f"{where}: name={name!r} must be an identifier that is not a keyword")
        continue
      where = f"sub-function {name!r}"
      if name in names:
        problems.append(f"{where} appears twice")
      ports = list(sub.get("inputs") or []) + [sub.get("output")]
      for p in ports:
        if (not isinstance(p, dict) or not isinstance(p.get("name"), str) or not _IDENT.match(p["name"])
            or p["name"] in _RESERVED or not isinstance(p.get("width"), int) or not 1 <= p["width"] <= 64):
          problems.append(f"{where}: port {p!r} must be {{\"name\": identifier, \"width\": 1..64}}")
      if not sub.get("inputs"):
        problems.append(f"{where} has no inputs")
      elif any(isinstance(p, dict) and p.get("name") in ("clk", "out") for p in sub["inputs"]):
        problems.append(f"{where}: 'clk' and 'out' are the RTL's own port names, not input names")
      for dep in sub.get("depends") or []:
        if dep not in names:
          problems.append(f"{where} depends on {dep!r}, which is not an earlier sub-function")
      for ex in sub.get("examples") or []:
        if (not isinstance(ex, dict) or not isinstance(ex.get("args"), list) or not isinstance(ex.get("out"), int)
            or len(ex["args"]) != len(sub.get("inputs") or []) or not all(isinstance(a, int) and a >= 0
                                                                           for a in ex["args"])):
          problems.append(f"{where}: example {ex!r} must be {{\"args\": [one int per input], \"out\": int}}")
      names.append(name)
    if problems:
      return problems
    top = plan[-1]
    want = [(p.name, p.width) for p in spec.inputs]
    got = [(p["name"], p["width"]) for p in top["inputs"]]
    if top["name"] != spec.top:
      problems.append(f"the last sub-function must be the top function {spec.top!r}, not {top['name']!r}")
    if got != want:
      problems.append(f"the top function's inputs {got} must be the spec's interface {want}")
    if top["output"]["width"] != spec.output.width:
      problems.append(f"the top function's output width {top['output']['width']} must be {spec.output.width}")
    return problems

  def understand(self, run: SpecRun, spec: Spec, feedback: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Module 1: summary, decomposition, descriptions, verification; iterates until the plan passes."""
    extra = ("\n\nEarlier attempts failed; take this into account:\n" + "\n".join(f"- {f}" for f in feedback)
             if feedback else "")
    summary = self._ask(run, "summarizer", f"Specification:\n\n{spec.text}\n\nSummarise in a few sentences what "
                        f"the design computes, its interface and its corner cases.{extra}", spec).strip()
    notes: list[str] = []
    for rnd in range(self.budgets.plan_rounds):
      notes_text = ("\n\nThe previous plan was rejected:\n" + "\n".join(f"- {n}" for n in notes)) if notes else ""
      answer = self._ask(
          run, "decomposer",
          f"Specification:\n\n{spec.text}\n\nSummary: {summary}\n\nDecompose the design into an ordered list of "
          "small sub-functions, each computable from unsigned integer inputs to one unsigned integer output. "
          "Answer with one ```json block: a list of objects {\"name\", \"function\" (one sentence), \"inputs\": "
          "[{\"name\", \"width\"}], \"output\": {\"name\", \"width\"}, \"plan\": [steps], \"depends\": [earlier "
          "names it calls], \"examples\": [{\"args\": [...], \"out\": n}]}. Dependencies come first; the last "
          f"entry is the top function {spec.top!r} with exactly the interface "
          f"{spec.interface_json()}.{extra}{notes_text}", spec, attempt=rnd)
      plan = roles.extract_json(answer, list)
      problems = self.check_plan(spec, plan)
      run.trace.append({"event": "check", "stage": "understanding", "tool": "structure", "attempt": rnd,
                        "ok": not problems, "error": "; ".join(problems)[:500]})
      if problems:
        notes = problems
        continue
      described = self._ask(run, "describer", f"Specification:\n\n{spec.text}\n\nPlan:\n{roles.format_plan(plan)}"
                            "\n\nDescribe every sub-function precisely for the programmers. Answer with one "
                            "```json object {name: description}.", spec, attempt=rnd)
      descriptions = roles.extract_json(described, dict) or {}
      for sub in plan:
        text = descriptions.get(sub["name"])
        sub["description"] = text if isinstance(text, str) else sub.get("function", "")
      verdict = self._ask(run, "verifier", f"Specification:\n\n{spec.text}\n\nPlan:\n{roles.format_plan(plan)}"
                          "\n\nDoes the plan implement the specification exactly (interface, widths, algorithm, "
                          "corner cases, examples)? Answer PASS, or FAIL followed by the reasons.", spec,
                          attempt=rnd)
      passed = bool(re.search(r"\bPASS\b", verdict)) and not re.search(r"\bFAIL\b", verdict)
      run.trace.append({"event": "check", "stage": "understanding", "tool": "verifier", "attempt": rnd,
                        "ok": passed, "error": "" if passed else verdict.strip()[:500]})
      if passed:
        return plan
      notes = [verdict.strip()[:800] or "the verifier gave no verdict"]
    self._intervene(run, spec, "understanding", None, "budget_exhausted",
                    f"no plan passed in {self.budgets.plan_rounds} rounds: {'; '.join(notes)}")
    fixed = self.human.plan(spec)
    if fixed is None:
      raise _Stop("understanding: no plan passed and no human answered")
    plan = [dict(s) for s in fixed["subfunctions"]]
    if self.check_plan(spec, plan):
      raise _Stop(f"understanding: the human's plan is not usable: {self.check_plan(spec, plan)}")
    return plan

  # --- Module 2 --------------------------------------------------------------------------------------------------

  def _vectors(self, spec: Spec, sub: Mapping[str, Any]) -> tuple[list[tuple[int, ...]], dict[tuple, int]]:
    """(input vectors, {inputs: known answer}) of a sub-function."""
    ins = execute.ports(sub["inputs"])
    known: dict[tuple, int] = {tuple(e["args"]): e["out"] for e in sub.get("examples") or []}
    if sub["name"] == spec.top:
      known.update({v.inputs: v.output for v in spec.vectors})
    vectors = execute.input_vectors(ins, self.budgets.vectors, f"{spec.name}/{sub['name']}", list(known))
    return vectors, known

  def _verify(self, spec: Spec, plan: Sequence[Mapping[str, Any]], k: int, stage: str, code: str,
              done: Mapping[tuple[str, str], str], golden: dict[str, tuple]) -> execute.Check:
    sub = plan[k]
    name = sub["name"]
    ins = execute.ports(sub["inputs"])
    out = execute.Port(sub["output"]["name"], sub["output"]["width"])
    earlier = [s["name"] for s in plan[:k]]
    if stage == "pseudocode":
      missing = [n for n in [name] + [p.name for p in ins] if not re.search(rf"\b{re.escape(n)}\b", code)]
      if not code.strip():
        return execute.Check(False, "structure", "the pseudocode is empty")
      if missing:
        return execute.Check(False, "structure", f"the pseudocode does not name {missing} of the interface")
      return execute.Check(True, "structure")
    full = "\n".join([*(done[(n, stage)] for n in earlier), code])
    vectors, known = self._vectors(spec, sub)
    if stage == "python":
      check = execute.run_python(full, name, vectors, out)
      if not check.ok:
        return check
      exp = [known[v] for v in vectors if v in known]
      got = [o for v, o in zip(vectors, check.outputs) if v in known]
      why = execute.compare([v for v in vectors if v in known], exp, got, name, ins)
      if why:
        return execute.Check(False, "python", "against the known answers (" +
                             ("spec vectors and examples" if name == spec.top else "the plan's examples") +
                             "): " + why, check.outputs)
      golden[name] = tuple(vectors), check.outputs
      return check
    gvec, gout = golden[name]
    if stage == "cpp":
      check = execute.run_cpp(full, name, ins, out, gvec)
    else:
      check = execute.run_dslx(full, name, ins, gvec)
    if not check.ok:
      return check
    why = execute.compare(gvec, gout, check.outputs, name, ins)
    if why:
      return execute.Check(False, check.tool, "against the Python golden model: " + why, check.outputs)
    return check

  def _code_stage(self, run: SpecRun, spec: Spec, plan, k: int, stage: str, done, golden, instructions,
                  feedback: Mapping[str, str]) -> execute.Check:
    """Up to `budgets.attempts` tries of one stage, the prompt optimiser between them; the last check."""
    sub = plan[k]
    name = sub["name"]
    top = name == spec.top
    earlier = [s for s in plan[:k] if s["name"] in (sub.get("depends") or [])] or plan[:k]
    check = execute.Check(False, "none", "not attempted")
    error = feedback.get(name, "")
    for attempt in range(self.budgets.attempts):
      parts = [f"Specification:\n\n{spec.text}", f"Sub-function {k + 1} of {len(plan)}:\n" +
               roles.format_plan([sub]), f"Interface in this language: {roles.signature(sub, stage, top)}"]
      for prev in roles.STAGES[:roles.STAGES.index(stage)]:
        parts.append(f"Its {prev} (verified):\n{done[(name, prev)]}")
      if earlier and stage != "pseudocode":
        parts.append("Earlier sub-functions, already defined:\n" +
                     "\n".join(done[(s['name'], stage)] for s in earlier))
      if error:
        parts.append(f"The previous attempt failed:\n{error}")
      parts.append("Instructions:\n" + instructions[stage])
      answer = self._ask(run, roles.CODER[stage], "\n\n".join(parts), spec, name, stage, attempt)
      code = roles.extract_code(answer, stage)
      check = self._verify(spec, plan, k, stage, code, done, golden)
      run.trace.append({"event": "check", "stage": stage, "subfunction": name, "attempt": attempt,
                        "tool": check.tool, "ok": check.ok, "error": check.error[:500]})
      self.log(f"{spec.name}: {name}/{stage} attempt {attempt}: {'ok' if check.ok else 'FAIL ' + check.tool}")
      if check.ok:
        done[(name, stage)] = code
        return check
      error = check.error
      if attempt + 1 < self.budgets.attempts:
        self._optimise(run, spec, stage, name, instructions, error, attempt)
    return check

  def _optimise(self, run, spec, stage, name, instructions, error, attempt):
    answer = self._ask(run, "prompt_optimizer", f"A {stage} coding agent was given these instructions:\n"
                       f"{roles.instructions_block(instructions[stage])}\n\nwhile writing {name!r} it failed:\n"
                       f"{error[:1500]}\n\nRewrite the instructions so that the mistake does not happen again. "
                       "Answer with the complete new instructions only.", spec, name, stage, attempt)
    new = answer.strip()
    if len(new) < 20:  # an empty or trivial rewrite would lose the instructions
      new = instructions[stage] + f"\nAvoid this earlier failure: {error.splitlines()[0][:300]}"
    run.optimisations.append({"stage": stage, "subfunction": name, "before": instructions[stage], "after": new})
    run.trace.append({"event": "optimise", "stage": stage, "subfunction": name})
    instructions[stage] = new

  # --- Module 3 --------------------------------------------------------------------------------------------------

  def _analyse(self, run, spec, plan, k, stage, error, done) -> dict[str, Any]:
    sub = plan[k]["name"]
    status = "\n".join(f"- {s['name']}: " + ", ".join(st for st in roles.STAGES if (s["name"], st) in done)
                       for s in plan)
    answer = self._ask(
        run, "error_analyzer",
        f"Specification:\n\n{spec.text}\n\nPlan:\n{roles.format_plan(plan)}\n\nVerified so far (stages per "
        f"sub-function):\n{status}\n\nStage {stage!r} of sub-function {sub!r} failed after "
        f"{self.budgets.attempts} attempts:\n{error[:2000]}\n\nWhere does the error come from? Choose a path: 1 = "
        "the specification was misunderstood (revise the plan), 2 = an earlier sub-function is wrong "
        "(regenerate it; give its name as target), 3 = the current sub-function's code is wrong (retry it), "
        "4 = it cannot be resolved automatically (ask a human). Answer with one JSON object "
        "{\"path\": 1-4, \"target\": name or null, \"reason\": \"...\"}.", spec, sub, stage)
    parsed = roles.extract_json(answer, dict) or {}
    path = parsed.get("path")
    if isinstance(path, str) and path.strip().isdigit():
      path = int(path)
    note = ""
    if path not in PATHS:
      m = re.search(r"path\D{0,5}([1-4])", answer, re.I)
      path = int(m.group(1)) if m else None
    if path is None:
      path, note = 3, "unparsable analysis: taken as path 3"
    target = parsed.get("target")
    earlier = [s["name"] for s in plan[:k]]
    if path == 2 and target not in earlier:
      path, note = 3, f"path 2 target {target!r} is not an earlier sub-function {earlier}: taken as path 3"
    reason = parsed.get("reason") if isinstance(parsed.get("reason"), str) else answer.strip()[:500]
    return {"path": path, "target": target if path == 2 else None, "reason": reason, "note": note}

  # --- the run ---------------------------------------------------------------------------------------------------

  def run(self, spec: Spec) -> SpecRun:
    run = SpecRun(spec.name)
    start = time.monotonic()
    try:
      self._run(run, spec)
    except _Stop as e:
      run.unresolved = str(e)
      self.log(f"{spec.name}: unresolved ({e})")
    run.seconds = round(time.monotonic() - start, 3)
    return run

  def _run(self, run: SpecRun, spec: Spec):
    instructions = dict(roles.DEFAULT_INSTRUCTIONS)
    understanding_feedback: list[str] = []
    feedback: dict[str, str] = {}
    plan = self.understand(run, spec)
    done: dict[tuple[str, str], str] = {}
    golden: dict[str, tuple] = {}
    human_fixed: set[tuple[str, str]] = set()
    k = 0
    while True:
      failure = None
      while k < len(plan):
        sub = plan[k]["name"]
        for stage in roles.STAGES:
          if (sub, stage) in done:
            continue
          check = self._code_stage(run, spec, plan, k, stage, done, golden, instructions, feedback)
          if not check.ok:
            failure = (k, stage, check.error)
            break
        if failure:
          break
        k += 1
      if failure is None:
        top = plan[-1]
        dslx = "\n".join(done[(s["name"], "hls")] for s in plan)
        gvec, gout = golden[top["name"]]
        check = execute.run_rtl(dslx, spec.top, execute.ports(top["inputs"]), execute.Port("out", spec.output.width),
                                gvec, gout, spec.pipeline_stages, synthesize=self.synthesize)
        run.trace.append({"event": "check", "stage": "rtl", "subfunction": spec.top, "tool": check.tool,
                          "ok": check.ok, "error": check.error[:500]})
        if check.ok:
          run.passed = True
          run.plan = plan
          run.code = {s["name"]: {st: done[(s["name"], st)] for st in roles.STAGES} for s in plan}
          run.verilog = check.detail.get("verilog", "")
          run.rtl = {k2: v for k2, v in check.detail.items() if k2 not in ("verilog", "testbench")}
          self.log(f"{spec.name}: RTL passes co-simulation ({run.rtl})")
          return
        failure = (len(plan) - 1, "rtl", check.error)
      k, stage, error = failure
      sub = plan[k]["name"]
      if (sub, stage) in human_fixed:
        raise _Stop(f"{sub}/{stage} still fails after a human's fix: {error[:300]}")
      if len(run.reflections) >= self.budgets.reflections:
        self._intervene(run, spec, stage, sub, "budget_exhausted", error)
        self._human_fix(run, spec, plan, k, stage, done, golden)
        human_fixed.add((sub, stage))
        continue
      analysis = self._analyse(run, spec, plan, k, stage, error, done)
      analysis.update(stage=stage, subfunction=sub, error=error[:500])
      run.reflections.append(analysis)
      run.trace.append({"event": "reflection", **{x: analysis[x] for x in ("path", "target", "stage",
                                                                            "subfunction")}})
      self.log(f"{spec.name}: reflection #{len(run.reflections)} at {sub}/{stage}: path {analysis['path']} "
               f"({PATHS[analysis['path']]}{', ' + analysis['target'] if analysis['target'] else ''})")
      path = analysis["path"]
      if path == 1:
        understanding_feedback.append(f"{sub}/{stage} failed ({error.splitlines()[0][:200] if error else ''}); "
                                      f"analysis: {analysis['reason'][:300]}")
        plan = self.understand(run, spec, understanding_feedback)
        done.clear()
        golden.clear()
        feedback.clear()
        human_fixed.clear()
        k = 0
      elif path == 2:
        j = [s["name"] for s in plan].index(analysis["target"])
        for s in plan[j:]:
          for st in ALL_STAGES:
            done.pop((s["name"], st), None)
            human_fixed.discard((s["name"], st))
          golden.pop(s["name"], None)
        feedback[analysis["target"]] = f"A later sub-function ({sub}) failed because of this one: " + \
            analysis["reason"][:500]
        k = j
      elif path == 3:
        if stage == "rtl":  # the top's HLS form is what the RTL came from
          stage = "hls"
        for st in ALL_STAGES[ALL_STAGES.index(stage):]:
          done.pop((sub, st), None)
          human_fixed.discard((sub, st))
        feedback[sub] = f"{error[:800]}\nAnalysis: {analysis['reason'][:400]}"
      else:
        self._intervene(run, spec, stage, sub, "escalated", error)
        self._human_fix(run, spec, plan, k, stage, done, golden)
        human_fixed.add((sub, stage))

  def _human_fix(self, run, spec, plan, k, stage, done, golden):
    """The human writes the failing stage's output (the RTL stage: the top's DSLX); it is verified like any."""
    sub = plan[k]["name"]
    target = "hls" if stage == "rtl" else stage
    code = self.human.fix(spec, sub, target)
    if code is None:
      raise _Stop(f"{sub}/{stage}: escalated and no human answered")
    if stage == "rtl":
      done.pop((sub, "hls"), None)
    check = self._verify(spec, plan, k, target, code, done, golden)
    run.trace.append({"event": "check", "stage": target, "subfunction": sub, "attempt": -1, "tool": check.tool,
                      "ok": check.ok, "error": check.error[:500], "by": "human"})
    if not check.ok:
      raise _Stop(f"{sub}/{target}: the human's code failed too: {check.error[:300]}")
    done[(sub, target)] = code
