"""The `scale_rtl` job: ScaleRTL test-time scaling (arXiv 2506.05566) on any backend, scored by simulation.

Units (each written atomically to the run directory as it finishes; `--config.resume=<dir>` skips them):

  sampling     repeated sampling: `repeated.n` answers per problem; pass@k against tokens generated
  rounds       budget-forced reflection with N = max(reflect.rounds) cues: pass@1 after every round <= N
  budget:<B>   reflection with a thinking-token budget of B tokens (N = max(reflect.rounds) cues at most)
  traces       offline reflection traces (injected bug, critique, correction; each verified by simulation),
               written to traces.jsonl for the MG-Verilog fine-tuning (`lacax.train.instruction_dataset`)

Writes results.json (every figure, backend, sampling, tool versions), scale_rtl.png (accuracy vs rounds, vs
token budget, and pass@k vs compute with the reflection points on the same axes) and prints the tables.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ml_collections

from lacax import runs
from lacax.hw import tools
from lacax.hw.backends import base, factory
from lacax.hw.bench import harness, sources
from lacax.hw.bench.problem import render_prompt
from lacax.hw.scale_rtl import planted, reflect, scaling
from lacax.hw.scale_rtl import traces as traces_lib

BACKENDS = factory.KINDS + ("planted",)


def validate(config) -> None:
  problems = []
  if config.backend.kind not in BACKENDS:
    problems.append(f"backend.kind={config.backend.kind!r} must be one of {BACKENDS}")
  rounds = list(config.reflect.rounds)
  if not rounds or any(not isinstance(r, int) or r < 0 for r in rounds):
    problems.append(f"reflect.rounds={rounds!r} must be non-negative integers")
  if any(not isinstance(b, int) or b < 1 for b in config.reflect.budgets):
    problems.append(f"reflect.budgets={list(config.reflect.budgets)!r} must be positive integers")
  if config.repeated.n < 0:
    problems.append(f"repeated.n={config.repeated.n!r} must be >= 0 (0 = no repeated sampling)")
  try:
    _reflect_config(config, max(rounds or [0]), 0)
  except ValueError as e:
    problems.append(str(e))
  if problems:
    raise ValueError("; ".join(problems))


def _reflect_config(config, rounds: int, budget: int) -> reflect.ReflectConfig:
  r = config.reflect
  return reflect.ReflectConfig(rounds=rounds, budget=budget, format=r.format, rules=r.rules, cue=r.cue,
                               feedback=r.feedback, continuation=r.continuation)


def _sampling(section, **over) -> base.Sampling:
  s = base.Sampling(n=int(section.n), temperature=float(section.temperature), top_p=float(section.top_p),
                    max_tokens=int(section.max_tokens), stop=tuple(section.stop), seed=int(section.seed))
  return dataclasses.replace(s, **over)


def _reflection_unit(problems, backend, config, rounds, budget, workers):
  sampling = _sampling(config.sampling)
  prompts = [render_prompt(p, config.prompt_style) for p in problems]
  cfg = _reflect_config(config, rounds, budget)
  counters = dict(getattr(backend, "counters", {}))
  ts = reflect.reflect(backend, prompts, sampling, cfg, problems=problems, simulator=config.simulator)
  scores = scaling.reflection_scores(problems, ts, rounds, simulator=config.simulator, workers=workers)
  after = dict(getattr(backend, "counters", {}))
  stops: dict[str, int] = {}
  for t in (t for row in ts for t in row):
    stops[t.stop] = stops.get(t.stop, 0) + 1
  budget_used = max((t.generated_tokens for row in ts for t in row), default=0)
  return {"config": cfg.to_json(), "scores": scores, "stops": stops, "max_generated_tokens": budget_used,
          "budget": budget or (rounds + 1) * sampling.max_tokens,
          "counted": sorted({t.counted for row in ts for t in row}),
          "backend_counters": {k: after.get(k, 0) - counters.get(k, 0) for k in after},
          "traces": [{"task_id": p.task_id, "samples": [t.to_json() for t in row]} for p, row in zip(problems, ts)]}


def plot(out: dict[str, Any], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  rs = (out.get("rounds") or {}).get("scores", [])
  axes[0].plot([s["rounds"] for s in rs], [s["pass@1"] for s in rs], "o-")
  axes[0].set(xlabel="reflection rounds N", ylabel="pass@1", title="accuracy vs rounds")
  bs = out.get("budgets", [])
  axes[1].plot([b["budget"] for b in bs], [b["pass@1"] for b in bs], "o-")
  axes[1].set(xlabel="thinking-token budget", ylabel="pass@1", title="accuracy vs token budget")
  curve = (out.get("sampling") or {}).get("curve", [])
  if curve:
    axes[2].plot([c["tokens"] for c in curve], [c["pass@k"] for c in curve], "o-", label="repeated sampling pass@k")
  axes[2].plot([s["tokens"] for s in rs], [s["pass@1"] for s in rs], "s--", label="reflection pass@1 (rounds)")
  axes[2].set(xlabel="tokens generated per problem", ylabel="pass rate", title="pass vs compute")
  axes[2].legend(fontsize=7)
  for ax in axes:
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, run_dir) -> dict[str, Any]:
  run_dir = runs.as_run_dir(run_dir)
  problems = sources.load_problems(config.benchmark)
  if config.backend.kind == "planted":
    backend = planted.planted_backend(problems)
  else:
    backend = factory.make_backend(config.backend, problems, style=config.prompt_style)
  workers = config.workers or None
  rounds = max(config.reflect.rounds)
  logging.info("scale_rtl: %d problems (%s), backend %s", len(problems), config.benchmark.kind, backend.describe())
  out: dict[str, Any] = {"backend": backend.describe(), "problems": [p.task_id for p in problems],
                         "sampling": None, "versions": tools.versions()}
  if config.repeated.n > 0:
    samp = _sampling(config.sampling, n=int(config.repeated.n), temperature=float(config.repeated.temperature),
                     top_p=float(config.repeated.top_p))
    out["sampling"] = run_dir.unit("sampling", lambda: scaling.repeated_sampling(
        problems, backend, samp, style=config.prompt_style, simulator=config.simulator, workers=workers))
  out["rounds"] = run_dir.unit("rounds", lambda: _reflection_unit(problems, backend, config, rounds, 0, workers))
  out["budgets"] = []
  for b in config.reflect.budgets:
    unit = run_dir.unit(f"budget:{b}", lambda b=b: _reflection_unit(problems, backend, config, rounds, b, workers))
    out["budgets"].append({"budget": b, "pass@1": unit["scores"][-1]["pass@1"],
                           "max_generated_tokens": unit["max_generated_tokens"],
                           "mean_tokens": unit["scores"][-1]["tokens"], "stops": unit["stops"]})
  if config.traces.enabled:
    def build():
      from lacax.hw.mg_verilog import tasks  # pylint: disable=g-import-not-at-top
      ts = tasks.generate(int(config.traces.per_template), seed=int(config.traces.seed))
      kept, stats = traces_lib.build(ts, workers=workers, simulator=config.simulator)
      traces_lib.write_jsonl(run_dir.file("traces.jsonl"), kept)
      return stats
    out["traces"] = run_dir.unit("traces", build)
  rs = out["rounds"]["scores"]
  print(harness.table([{**s, "samples": f"{s['passed']}/{s['samples']}"} for s in rs],
                      ["rounds", "pass@1", "samples", "tokens", "reached"]))
  print(harness.table(out["budgets"], ["budget", "pass@1", "mean_tokens", "max_generated_tokens"]))
  if out["sampling"]:
    print(harness.table(out["sampling"]["curve"], ["k", "pass@k", "tokens"]))
  err = runs.safe_plot("scale_rtl", plot, out, run_dir.file("scale_rtl.png"),
                       f"ScaleRTL on {config.benchmark.kind} ({len(problems)} problems), {backend.describe().get('kind')}")
  if err:
    out["plot_error"] = err
  return out

