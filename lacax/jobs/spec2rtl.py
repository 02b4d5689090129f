"""The `spec2rtl` job: Spec2RTL-Agent on a set of specification documents, interventions per spec and stage.

One RunDir unit per spec (`spec:<name>`), so an interrupted run resumes at the next spec. Writes

  results.json        per spec: passed, interventions (total and by stage), reflections by path, prompt
                      optimisations, backend calls, RTL cells / flip-flops / depth, seconds; totals; backend,
                      sampling, budgets, tool versions, sandbox isolation
  specs/<name>.json   the full record of a spec's run: plan, code of every stage, Verilog, the event trace
  specs/<name>.v      the final RTL
  interventions.png   human interventions per spec, stacked by stage

and prints the table.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections

from lacax import errors
from lacax import io
from lacax import runs
from lacax.hw import sandbox
from lacax.hw import tools
from lacax.hw.backends import base
from lacax.hw.backends import factory
from lacax.hw.backends.scripted import RecordingBackend
from lacax.hw.spec2rtl import agent as agent_lib
from lacax.hw.spec2rtl import reference
from lacax.hw.spec2rtl import spec as spec_lib

BACKENDS = ("reference", "replay", "local", "openai_http")


def _spec_names(config) -> list[str]:
  return [s.strip() for s in str(config.specs).split(",") if s.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
  problems = errors.Problems()
  names = _spec_names(config)
  problems.check(bool(names), f"specs={config.specs!r} must name at least one shipped spec or spec file")
  for name in names:
    try:
      spec_lib.resolve(name)
    except (spec_lib.SpecError, errors.ConfigError) as e:
      problems.add(f"specs: {e}")
  problems.check(config.backend.kind in BACKENDS, f"backend.kind={config.backend.kind!r} must be one of {BACKENDS}")
  if config.backend.kind == "replay":
    problems.check(bool(config.backend.path), "backend.kind='replay' needs backend.path (a replay JSONL file)")
  if config.backend.kind == "openai_http":
    problems.check(bool(config.backend.base_url and config.backend.model),
                   "backend.kind='openai_http' needs backend.base_url and backend.model")
  problems.check(config.human in agent_lib.HUMANS, f"human={config.human!r} must be one of {sorted(agent_lib.HUMANS)}")
  try:
    budgets(config)
  except ValueError as e:
    problems.add(str(e))
  try:
    sampling(config)
  except ValueError as e:
    problems.add(str(e))
  problems.raise_if_any("configs/spec2rtl.py")


def budgets(config) -> agent_lib.Budgets:
  b = config.budgets
  return agent_lib.Budgets(plan_rounds=b.plan_rounds, attempts=b.attempts, reflections=b.reflections,
                           vectors=b.vectors, max_calls=b.max_calls)


def sampling(config) -> base.Sampling:
  s = config.sampling
  return base.Sampling(n=1, temperature=float(s.temperature), top_p=float(s.top_p), max_tokens=int(s.max_tokens),
                       seed=int(s.seed))


def make_backend(config):
  if config.backend.kind == "reference":
    return reference.reference_backend()
  return factory.make_backend(config.backend)


def plot_interventions(rows: list[dict[str, Any]], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 3.4))
  names = [r["spec"] for r in rows]
  xs = list(range(len(rows)))
  bottom = [0] * len(rows)
  for stage in agent_lib.ALL_STAGES:
    counts = [r["interventions_by_stage"][stage] for r in rows]
    if any(counts):
      ax.bar(xs, counts, bottom=bottom, label=stage)
      bottom = [b + c for b, c in zip(bottom, counts)]
  ax.set_xticks(xs)
  ax.set_xticklabels(names)
  ax.set_xlim(-0.6, len(rows) - 0.4)
  for i, r in enumerate(rows):
    ax.text(i, bottom[i] + 0.05, "pass" if r["passed"] else "fail", ha="center", va="bottom", fontsize=8)
  ax.set_ylabel("human interventions")
  ax.set_ylim(0, max(bottom + [1]) + 1)
  ax.set_title(title)
  if any(bottom):
    ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def _table(rows: list[dict[str, Any]]) -> str:
  cols = ["spec", "passed", "interventions", *agent_lib.ALL_STAGES, "reflections", "paths 1/2/3/4", "calls",
          "cells", "seconds"]
  lines = [" | ".join(cols)]
  for r in rows:
    paths = "/".join(str(r["reflections_by_path"][str(p)]) for p in agent_lib.PATHS)
    lines.append(" | ".join(str(x) for x in [
        r["spec"], r["passed"], r["interventions"], *(r["interventions_by_stage"][s] for s in agent_lib.ALL_STAGES),
        r["reflections"], paths, r["backend_calls"], r["rtl"].get("cells", "-"), r["seconds"]]))
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, run_dir: str | runs.RunDir) -> dict[str, Any]:
  validate(config)
  run_dir = runs.as_run_dir(run_dir)
  backend = make_backend(config)
  recorder = RecordingBackend(backend) if config.record else None
  agent = agent_lib.Agent(recorder or backend, sampling(config), budgets(config), agent_lib.HUMANS[config.human](),
                          synthesize=bool(config.synthesize), log=lambda m: logging.info("spec2rtl: %s", m))
  rows = []
  for name in _spec_names(config):
    spec = spec_lib.resolve(name)

    def compute(spec=spec):
      result = agent.run(spec).to_json()
      io.write_json(run_dir.file("specs", f"{spec.name}.json"), result)
      if result["verilog"]:
        io.atomic_write_text(run_dir.file("specs", f"{spec.name}.v"), result["verilog"])
      return {k: v for k, v in result.items() if k not in ("code", "verilog", "trace", "plan", "intervention_log")} | {
          "reflections": len(result["reflections"]),
          "intervention_log": [{k: i[k] for k in ("stage", "subfunction", "reason")} for i in
                               result["intervention_log"]]}

    row = run_dir.unit(f"spec:{spec.name}", compute)
    rows.append(row)
    logging.info("spec2rtl: %s passed=%s interventions=%d", spec.name, row["passed"], row["interventions"])
  if recorder is not None:
    recorder.save(config.record)
  title = f"Spec2RTL interventions: {backend.describe().get('kind')}"
  plot_error = runs.safe_plot("interventions.png", plot_interventions, rows, run_dir.file("interventions.png"),
                              title)
  print(_table(rows))
  by_stage = {s: sum(r["interventions_by_stage"][s] for r in rows) for s in agent_lib.ALL_STAGES}
  return {
      "specs": rows,
      "totals": {"specs": len(rows), "passed": sum(r["passed"] for r in rows),
                 "interventions": sum(r["interventions"] for r in rows), "interventions_by_stage": by_stage,
                 "reflections": sum(r["reflections"] for r in rows),
                 "backend_calls": sum(r["backend_calls"] for r in rows)},
      "backend": backend.describe(), "sampling": sampling(config).to_json(), "budgets": dict(config.budgets),
      "human": config.human, "tool_versions": tools.versions(), "sandbox": sandbox.isolation(),
      "hls_note": "C++-to-HLS replaced by DSLX/XLS: no C++ HLS tool installs offline",
      "plot_error": plot_error,
  }
