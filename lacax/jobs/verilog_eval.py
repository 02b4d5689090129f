"""The `verilog_eval` job: any backend on any hardware benchmark folder, scored by simulation in the sandbox.

Loads the problems (`lacax.hw.bench.sources`), builds the backend (`lacax.hw.backends.factory`: oracle, replay,
the local lacax model, or an OpenAI-compatible server URL), generates `sampling.n` answers per problem,
simulates them (iverilog, verilator, or iverilog with verilator for what iverilog cannot compile), and writes:

  results.jsonl          one line per problem: categories of every sample, c of n, pass@k, reason, completions
  results_summary.json   pass@k (also excluding known benchmark issues), counts per failure category, every
                         failing item with its reason, backend, sampling, tool versions, sandbox isolation
  categories.png         samples per failure category

and prints a table of the failing items and the pass@k figures.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections

from lacax.hw.backends import base
from lacax.hw.backends import factory
from lacax.hw.bench import harness
from lacax.hw.bench import sources


def sampling_from(section) -> base.Sampling:
  return base.Sampling(n=int(section.n), temperature=float(section.temperature), top_p=float(section.top_p),
                       max_tokens=int(section.max_tokens), stop=tuple(section.stop), seed=int(section.seed))


def plot_categories(summary: dict[str, Any], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from lacax.hw.tools import sim  # pylint: disable=g-import-not-at-top

  cats = [c for c in sim.CATEGORIES if summary["categories"].get(c)]
  fig, ax = plt.subplots(figsize=(7, 3.2))
  ax.bar(cats, [summary["categories"][c] for c in cats], color="tab:blue")
  ax.set_ylabel("samples")
  ax.set_title(title)
  plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  problems = sources.load_problems(config.benchmark)
  backend = factory.make_backend(config.backend, problems, style=config.prompt_style)
  sampling = sampling_from(config.sampling)
  logging.info("verilog_eval: %d problems from %s, backend %s", len(problems), config.benchmark.kind,
               backend.describe())
  report = harness.evaluate(problems, backend, sampling, simulator=config.simulator, style=config.prompt_style,
                            workers=config.workers or None, batch_size=config.batch_size,
                            progress=lambda m: logging.info("verilog_eval: %s", m))
  ks = tuple(config.ks)
  report.write(run_dir, "results", ks=ks)
  summary = report.summary(ks)
  name = f"{config.benchmark.kind}" + (f"/{config.benchmark.task}" if config.benchmark.kind == "verilog_eval" else "")
  plot_categories(summary, os.path.join(run_dir, "categories.png"), f"{name}: {backend.describe().get('kind')}")
  fails = [{"task_id": r.task_id, "c/n": f"{r.c}/{r.n}", "reason": r.reason[:110]} for r in report.results
           if r.c < r.n]
  if fails:
    print(harness.table(fails, ["task_id", "c/n", "reason"]))
  rows = [{"benchmark": name, "backend": backend.describe().get("kind"), "problems": len(problems),
           "passed_any": report.passed, **{f"pass@{k}": summary.get(f"pass@{k}") for k in ks}}]
  print(harness.table(rows, ["benchmark", "backend", "problems", "passed_any", *(f"pass@{k}" for k in ks)]))
  print("categories:", summary["categories"])
  return {k: v for k, v in summary.items() if k != "failures"} | {"failures": summary["failures"]}
