"""Evaluate any backend on any list of `Problem`s: generate, assemble, simulate in the sandbox, score.

  report = harness.evaluate(problems, backend, Sampling(n=5, temperature=0.7), simulator="iverilog")

For every problem: one prompt (`render_prompt`), `sampling.n` completions, each assembled into a design file
(`problem.assemble`) and simulated with the problem's testbench (iverilog, or verilator, or iverilog then
verilator for what iverilog cannot compile: `simulator="iverilog+verilator"`). Simulations run in parallel over
the cores (`sandbox.parallel_map`). Each problem's result (`ProblemResult`) keeps every sample's category and
detail (`lacax.hw.tools.sim.CATEGORIES`), c of n passing, pass@k, and the problem's known issue if any; the
`Report` has pass@k (unbiased, exact per problem), counts per category, and writes JSONL (one line per
problem) and a summary JSON. Every result records the backend, the sampling parameters and the tool versions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

from lacax.hw import sandbox
from lacax.hw import tools
from lacax.hw.backends.base import Backend, Sampling
from lacax.hw.bench import passk
from lacax.hw.bench.problem import Problem, assemble, render_prompt
from lacax.hw.tools import iverilog, sim, verilator

SIMULATORS = ("iverilog", "verilator", "iverilog+verilator")


@dataclasses.dataclass(frozen=True)
class SampleResult:
  category: str
  detail: str
  simulator: str
  wall_s: float

  @property
  def passed(self) -> bool:
    return self.category == "pass"


@dataclasses.dataclass(frozen=True)
class ProblemResult:
  """One problem: its n samples' outcomes, c passing, pass@k, the known issue and the first failure's reason."""

  task_id: str
  benchmark: str
  samples: tuple[SampleResult, ...]
  known_issue: str | None
  meta: Mapping[str, Any]
  completions: tuple[str, ...] = ()

  @property
  def n(self) -> int:
    return len(self.samples)

  @property
  def c(self) -> int:
    return sum(s.passed for s in self.samples)

  def pass_at(self, k: int) -> float | None:
    return passk.pass_at_k(self.n, self.c, k)

  @property
  def reason(self) -> str:
    """Why it failed: the first failing sample's category and detail, plus the known issue if any."""
    fail = next((s for s in self.samples if not s.passed), None)
    if fail is None:
      return ""
    text = f"{fail.category}: {fail.detail}" if fail.detail else fail.category
    return f"{text} [known: {self.known_issue}]" if self.known_issue else text

  def to_json(self, ks: Sequence[int] = (1, 5, 10), keep_completions: bool = False) -> dict[str, Any]:
    d = {"task_id": self.task_id, "benchmark": self.benchmark, "n": self.n, "c": self.c,
         "categories": [s.category for s in self.samples], "details": [s.detail for s in self.samples],
         "simulators": [s.simulator for s in self.samples], "known_issue": self.known_issue,
         "reason": self.reason, "meta": dict(self.meta)}
    for k in ks:
      v = self.pass_at(k)
      if v is not None:
        d[f"pass@{k}"] = v
    if keep_completions:
      d["completions"] = list(self.completions)
    return d


@dataclasses.dataclass(frozen=True)
class Report:
  results: tuple[ProblemResult, ...]
  backend: Mapping[str, Any]
  sampling: Mapping[str, Any]
  simulator: str
  versions: Mapping[str, Any]
  isolation: Mapping[str, Any]
  wall_s: float
  gen_s: float

  def pass_at(self, k: int, exclude_known: bool = False) -> float | None:
    rs = [r for r in self.results if not (exclude_known and r.known_issue)]
    return passk.mean_pass_at_k([(r.n, r.c) for r in rs], k)

  @property
  def passed(self) -> int:
    """Problems with at least one passing sample."""
    return sum(r.c > 0 for r in self.results)

  def categories(self) -> dict[str, int]:
    return dict(collections.Counter(s.category for r in self.results for s in r.samples))

  def failures(self) -> list[dict[str, Any]]:
    return [{"task_id": r.task_id, "reason": r.reason} for r in self.results if r.c < r.n]

  def summary(self, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    out: dict[str, Any] = {"problems": len(self.results), "passed_any": self.passed,
                           "known_issues": sum(bool(r.known_issue) for r in self.results),
                           "categories": self.categories(), "simulator": self.simulator,
                           "backend": dict(self.backend), "sampling": dict(self.sampling),
                           "versions": dict(self.versions), "isolation": dict(self.isolation),
                           "wall_s": self.wall_s, "generate_s": self.gen_s, "failures": self.failures()}
    for k in ks:
      v = self.pass_at(k)
      if v is not None:
        out[f"pass@{k}"] = v
        out[f"pass@{k}_excluding_known_issues"] = self.pass_at(k, exclude_known=True)
    return out

  def write(self, out_dir: str, name: str = "results", ks: Sequence[int] = (1, 5, 10),
            keep_completions: bool = True) -> tuple[str, str]:
    """Writes `<name>.jsonl` (one line per problem) and `<name>_summary.json`, atomically."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, f"{name}.jsonl")
    tmp = f"{jsonl}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in self.results:
        f.write(json.dumps(r.to_json(ks, keep_completions), ensure_ascii=False) + "\n")
    os.replace(tmp, jsonl)
    summ = os.path.join(out_dir, f"{name}_summary.json")
    tmp = f"{summ}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.summary(ks), f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, summ)
    return jsonl, summ


def simulate_design(problem: Problem, design: str, simulator: str = "iverilog",
                    limits: sandbox.Limits | None = None) -> sim.SimResult:
  """Simulates one assembled design against the problem's testbench."""
  if simulator not in SIMULATORS:
    raise ValueError(f"simulator={simulator!r} must be one of {SIMULATORS}")
  sources = problem.sources(design)
  kw = dict(top=problem.sim_top, judge=problem.judge, data_files=problem.data_files)
  if simulator == "verilator":
    return verilator.simulate(sources, **kw, **({"limits": limits} if limits else {}))
  res = iverilog.simulate(sources, **kw, **({"limits": limits} if limits else {}))
  if simulator == "iverilog+verilator" and res.category in ("syntax_error", "elaboration_error"):
    return verilator.simulate(sources, **kw)
  return res


def score_answers(problems: Sequence[Problem], answers: Sequence[Sequence[str]], simulator: str = "iverilog",
                  workers: int | None = None, limits: sandbox.Limits | None = None) -> list[ProblemResult]:
  """Simulates every answer (answers[i] are problem i's completions) in parallel; one result per problem."""
  if len(problems) != len(answers):
    raise ValueError(f"{len(problems)} problems but {len(answers)} answer lists")
  jobs = [(i, a) for i, ans in enumerate(answers) for a in ans]

  def one(job):
    i, answer = job
    t = time.monotonic()
    res = simulate_design(problems[i], assemble(problems[i], answer), simulator, limits)
    return SampleResult(res.category, res.detail, res.simulator, time.monotonic() - t)

  outcomes = sandbox.parallel_map(one, jobs, workers)
  per = collections.defaultdict(list)
  for (i, _), o in zip(jobs, outcomes):
    per[i].append(o)
  return [ProblemResult(p.task_id, p.benchmark, tuple(per[i]), p.known_issue(simulator.split("+")[0]),
                        dict(p.meta, **({"known_issues": dict(p.known_issues)} if p.known_issues else {})),
                        tuple(answers[i]))
          for i, p in enumerate(problems)]


def evaluate(problems: Sequence[Problem], backend: Backend, sampling: Sampling = Sampling(), *,
             simulator: str = "iverilog", style: str = "chat", system: str | None = None,
             workers: int | None = None, batch_size: int = 64, limits: sandbox.Limits | None = None,
             progress: Callable[[str], None] | None = None) -> Report:
  """Generates `sampling.n` answers per problem with `backend`, simulates them, and scores pass@k."""
  if not problems:
    raise ValueError("problems is empty")
  if simulator not in SIMULATORS:
    raise ValueError(f"simulator={simulator!r} must be one of {SIMULATORS}")
  start = time.monotonic()
  prompts = [render_prompt(p, style, system) for p in problems]
  answers: list[list[str]] = []
  for lo in range(0, len(prompts), batch_size):
    batch = backend.generate(prompts[lo:lo + batch_size], sampling)
    if len(batch) != len(prompts[lo:lo + batch_size]) or any(len(c) != sampling.n for c in batch):
      raise ValueError(f"backend {backend.describe()} returned {[len(c) for c in batch]} completions for "
                       f"{len(prompts[lo:lo + batch_size])} prompts x n={sampling.n}")
    answers.extend([c.text for c in cs] for cs in batch)
    if progress:
      progress(f"generated {len(answers)}/{len(prompts)}")
  gen_s = time.monotonic() - start
  results = score_answers(problems, answers, simulator, workers, limits)
  return Report(tuple(results), backend.describe(), sampling.to_json(), simulator, tools.versions(),
                sandbox.isolation(), time.monotonic() - start, gen_s)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A plain-text table of `rows` (dicts) over `columns`; floats as 0.000."""
  def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)
