"""The `gpt4aigchip` job: evolutionary design-space search vs random search on the GEMM template (arXiv 2309.10730).

For every method ("evolution", "random") and seed, `search.budget` proposals are evaluated for real
(`lacax.hw.aigchip.evaluate`: iverilog simulation of the workload against its golden product, yosys cells), with
every evaluation cached by design hash as a run-directory unit (`eval/<key>`) and every finished search a unit
(`search/<method>/seed<seed>`), so `--config.resume=<run dir>` finishes an interrupted run without repeating work.

Writes `results.json` (per method and seed: best fitness, proposals to reach it, the best design, failures; the
Pareto front of cycles vs cells), `trajectories.jsonl` (every proposal), `fitness_vs_evaluations.png` (best
fitness so far per method: seeds thin, mean thick) and `pareto.png` (every fit design, the front marked), and
prints the table.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np

from lacax import errors
from lacax import runs
from lacax.hw.aigchip import ablation as ablation_lib
from lacax.hw.aigchip import demos as demos_lib
from lacax.hw.aigchip import evaluate as evaluate_lib
from lacax.hw.aigchip import search as search_lib
from lacax.hw.aigchip import template
from lacax.hw.backends import base

METHODS = ("evolution", "random")
PROPOSERS = ("backend", "heuristic")
BACKENDS = ("scripted", "local", "openai_http")


def _workload(config) -> template.Workload:
  return template.Workload(**{k: int(v) for k, v in config.workload.items()})


def _space(config) -> dict[str, tuple[Any, ...]]:
  return search_lib.check_space({k: tuple(v) for k, v in config.space.items()})


def _pe_source(config) -> str:
  """template.pe ("verilog" when a config from before the option has no `template` block)."""
  return config.get("template", {}).get("pe", "verilog")


def validate(config: ml_collections.ConfigDict) -> None:
  problems = errors.Problems()
  try:
    _workload(config)
  except (ValueError, TypeError) as e:
    problems.add(str(e))
  try:
    _space(config)
  except ValueError as e:
    problems.add(str(e))
  for seed in config.search.seeds:
    try:
      search_lib.SearchConfig(budget=config.search.budget, population=config.search.population,
                              tournament=config.search.tournament, seed=int(seed))
    except ValueError as e:
      problems.add(str(e))
      break
  if not config.search.seeds:
    problems.add("search.seeds is empty: give at least one seed, e.g. (0,)")
  bad = [m for m in config.methods if m not in METHODS]
  if bad or not config.methods:
    problems.add(f"methods={tuple(config.methods)!r} must be a non-empty subset of {METHODS}")
  if config.proposer not in PROPOSERS:
    problems.add(f"proposer={config.proposer!r} must be one of {PROPOSERS}")
  if config.search.mode not in search_lib.MODES:
    problems.add(f"search.mode={config.search.mode!r} must be one of {search_lib.MODES}")
  if config.backend.kind not in BACKENDS:
    problems.add(f"backend.kind={config.backend.kind!r} must be one of {BACKENDS}")
  if config.backend.kind == "openai_http" and config.proposer == "backend" and not (
      config.backend.base_url and config.backend.model):
    problems.add("backend.kind='openai_http' needs backend.base_url (e.g. http://127.0.0.1:8000/v1) and "
                 "backend.model")
  if config.demos.selector not in demos_lib.SELECTORS:
    problems.add(f"demos.selector={config.demos.selector!r} must be one of {demos_lib.SELECTORS}")
  if config.demos.library and not os.path.isfile(config.demos.library):
    problems.add(f"demos.library={config.demos.library!r} is not a file (a JSON demo library; '' = the shipped one)")
  ab = config.get("ablation")
  if ab is not None and ab.enabled:
    bad = [x for x in ab.selectors if x not in demos_lib.SELECTORS]
    if bad:
      problems.add(f"ablation.selectors contains {bad}; expected names from {demos_lib.SELECTORS}")
    bad = [t for t in ab.targets if t not in ablation_lib.TARGETS]
    if bad:
      problems.add(f"ablation.targets contains {bad}; expected names from {sorted(ablation_lib.TARGETS)}")
    else:
      for t in ab.targets:
        try:
          ablation_lib.target_design(t, _workload(config))
        except (ValueError, TypeError) as e:
          problems.add(str(e))
    if config.proposer != "backend":
      problems.add(f"ablation.enabled needs proposer='backend' (a backend writes the modules), got "
                   f"proposer={config.proposer!r}")
    if int(ab.n) < 1:
      problems.add(f"ablation.n={ab.n!r} must be an integer >= 1")
  pe = _pe_source(config)
  if pe not in evaluate_lib.PE_SOURCES:
    problems.add(f"template.pe={pe!r} must be one of {evaluate_lib.PE_SOURCES} (dslx: the PE's multiply-accumulate "
                 "in DSLX, built by XLS)")
  elif pe == "dslx" and config.search.mode == "code" and config.proposer == "backend":
    problems.add("template.pe='dslx' conflicts with search.mode='code' (there the backend writes the PE): use "
                 "template.pe='verilog' or search.mode='config'")
  if float(config.search.area_weight) < 0:
    problems.add(f"search.area_weight={config.search.area_weight!r} must be >= 0")
  problems.raise_if_any("gpt4aigchip config")


def make_backend(config, space):
  kind = config.backend.kind
  if kind == "scripted":
    from lacax.hw.backends.scripted import ScriptedBackend  # pylint: disable=g-import-not-at-top
    return ScriptedBackend(default=search_lib.scripted_designer(space), name="scripted_designer")
  from lacax.hw.backends import factory  # pylint: disable=g-import-not-at-top
  return factory.make_backend(config.backend)


def _plot_curves(summaries, path, budget):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  colors = {"evolution": "tab:red", "random": "tab:blue"}
  for method, per_seed in summaries.items():
    curves = []
    for s in per_seed.values():
      ys = [np.nan if v is None else v for v in s["curve"]]
      ax.plot(range(1, len(ys) + 1), ys, color=colors.get(method, "gray"), alpha=0.3, lw=1)
      curves.append(ys)
    # the mean only where every seed has a fit design (a mean over fewer seeds could fall as seeds join)
    mean = np.mean(np.array(curves, dtype=float), axis=0) if curves else []
    ax.plot(range(1, len(mean) + 1), mean, color=colors.get(method, "gray"), lw=2.2, label=f"{method} (mean)")
  ax.set_xlabel("evaluations (proposals)")
  ax.set_ylabel("best fitness so far  (-log2 cycles*cells^w)")
  ax.set_xlim(1, budget)
  ax.legend(fontsize=8)
  ax.set_title("GPT4AIGChip: search vs random at equal budget")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def _plot_pareto(records, front, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  markers = {"os": "o", "ws": "s", "is": "^"}
  for df, mk in markers.items():
    pts = [r for r in records if r["design"]["dataflow"] == df]
    if pts:
      ax.scatter([r["cells"] for r in pts], [r["cycles"] for r in pts], marker=mk, alpha=0.55, label=df)
  if front:
    ax.plot([r["cells"] for r in front], [r["cycles"] for r in front], "k--", lw=1, marker="x", ms=9,
            label="Pareto front")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("area (yosys cells)")
  ax.set_ylabel("latency (simulated cycles)")
  ax.legend(fontsize=8)
  ax.set_title("every design that passed simulation")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def _ablation(config, rd, backend, workload, library) -> list[dict[str, Any]]:
  """The demo ablations (`lacax.hw.aigchip.ablation`): each selector at `demos.k` demos, and the count sweep."""
  ab = config.ablation
  cells = [(sel, 0 if sel == "none" else int(config.demos.k)) for sel in ab.selectors]
  cells += [(ab.count_selector if k else "none", int(k)) for k in ab.counts]
  cells = list(dict.fromkeys(cells))
  sampling = base.Sampling(n=int(ab.n), temperature=float(ab.temperature), top_p=float(config.sampling.top_p),
                           max_tokens=int(ab.max_tokens))
  rows = []
  for target in ab.targets:
    for sel, k in cells:
      if sel == "embedding" and "embeddings" not in getattr(backend, "capabilities", ()):
        logging.warning("gpt4aigchip ablation: backend %s has no embeddings; selector 'embedding' skipped",
                        backend.describe())
        continue
      rows.append(rd.unit(f"ablation/{sel}/k{k}/{target}", lambda sel=sel, k=k, target=target: ablation_lib.run_cell(
          backend, sel, k, target, workload, library, sampling, seed=int(config.search.seeds[0]))))
  return rows


def run(config: ml_collections.ConfigDict, run_dir) -> dict[str, Any]:
  validate(config)
  rd = runs.as_run_dir(run_dir)
  t0 = time.monotonic()
  workload = _workload(config)
  space = _space(config)
  evaluator = evaluate_lib.Evaluator(workload, synth=bool(config.search.synth),
                                     area_weight=float(config.search.area_weight), run_dir=rd,
                                     cache_dir=config.search.get("cache_dir") or None,
                                     pe=_pe_source(config))
  backend = None
  if config.proposer == "backend" and ("evolution" in config.methods or config.ablation.enabled):
    backend = make_backend(config, space)
  sampling = base.Sampling(temperature=float(config.sampling.temperature), top_p=float(config.sampling.top_p),
                           max_tokens=int(config.sampling.max_tokens))
  library = demos_lib.load_library(config.demos.library or None)
  if backend is not None:
    proposer = search_lib.BackendProposer(backend, space, workload, mode=config.search.mode, sampling=sampling,
                                          area_weight=float(config.search.area_weight),
                                          selector=config.demos.selector, k_demos=int(config.demos.k),
                                          library=library)
  else:
    proposer = search_lib.HeuristicProposer(space)
  summaries: dict[str, dict[str, Any]] = {}
  trajectories: dict[str, dict[str, Any]] = {}
  for method in config.methods:
    for seed in config.search.seeds:
      scfg = search_lib.SearchConfig(budget=int(config.search.budget), population=int(config.search.population),
                                     tournament=int(config.search.tournament), seed=int(seed))
      key = f"search/{method}/seed{int(seed)}"

      def compute(method=method, scfg=scfg):
        tm = time.monotonic()
        if method == "evolution":
          hist = search_lib.evolve(evaluator, proposer, scfg, space,
                                   progress=lambda m: logging.info("gpt4aigchip evolution seed %d: %s", scfg.seed, m))
        else:
          hist = search_lib.random_search(evaluator, scfg, space)
        return {"history": hist, "wall_s": time.monotonic() - tm}

      unit = rd.unit(key, compute)
      trajectories.setdefault(method, {})[str(seed)] = unit["history"]
      summaries.setdefault(method, {})[str(seed)] = {**search_lib.summarize(unit["history"]),
                                                     "wall_s": unit["wall_s"]}
      s = summaries[method][str(seed)]
      logging.info("gpt4aigchip: %s seed %s: best %s after %s proposals (%s)", method, seed, s["best_fitness"],
                   s["evals_to_best"], s["best_design"])
  ablation_rows = _ablation(config, rd, backend, workload, library) if config.get("ablation") and \
      config.ablation.enabled else []
  all_records = [r for m in trajectories.values() for h in m.values() for r in h]
  fit = list({json.dumps(r["design"], sort_keys=True): r for r in all_records if r.get("ok")}.values())
  front = search_lib.pareto(all_records)
  with open(rd.file("trajectories.jsonl") + ".tmp", "w", encoding="utf-8") as f:
    for method, per_seed in trajectories.items():
      for seed, hist in per_seed.items():
        for r in hist:
          f.write(json.dumps({"method": method, "seed": int(seed), **r}, default=str) + "\n")
  os.replace(rd.file("trajectories.jsonl") + ".tmp", rd.file("trajectories.jsonl"))
  plot_errors = {
      "fitness_vs_evaluations": runs.safe_plot("fitness_vs_evaluations", _plot_curves, summaries,
                                               rd.file("fitness_vs_evaluations.png"), int(config.search.budget)),
      "pareto": runs.safe_plot("pareto", _plot_pareto, fit, front, rd.file("pareto.png")),
  }
  rows = []
  for method, per_seed in summaries.items():
    bests = [s["best_fitness"] for s in per_seed.values() if s["best_fitness"] is not None]
    reach = [s["evals_to_best"] for s in per_seed.values() if s["evals_to_best"] is not None]
    rows.append({"method": method, "proposer": proposer.name if method == "evolution" else "uniform",
                 "seeds": len(per_seed), "budget": int(config.search.budget),
                 "best_fitness_mean": float(np.mean(bests)) if bests else None,
                 "best_fitness_max": max(bests) if bests else None,
                 "evals_to_best_mean": float(np.mean(reach)) if reach else None,
                 "fit_fraction": float(np.mean([s["fit"] / s["evaluations"] for s in per_seed.values()])),
                 "unique_designs_mean": float(np.mean([s["unique_designs"] for s in per_seed.values()]))})
    if method == "evolution" and "random" in summaries:
      # per seed: the first proposal at which evolution's best so far reaches random search's final best
      reached = []
      for seed, s in per_seed.items():
        target = summaries["random"].get(seed, {}).get("best_fitness")
        hit = next((i + 1 for i, v in enumerate(s["curve"]) if v is not None and target is not None and
                    v >= target), None)
        reached.append(hit)
      rows[-1]["reaches_random_best"] = f"{sum(h is not None for h in reached)}/{len(reached)}"
      rows[-1]["evals_to_random_best"] = reached
  cols = list(dict.fromkeys(c for r in rows for c in r))
  from lacax.hw.bench import harness  # pylint: disable=g-import-not-at-top
  print(harness.table(rows, cols))
  print("Pareto front (cycles, cells):", [(r["cycles"], r["cells"], r["design"]) for r in front][:8])
  if ablation_rows:
    acols = ["selector", "k", "target", "n", "compile@1", "functional@1", "fixed@1", "demos"]
    print(harness.table([{c: r.get(c) for c in acols} for r in ablation_rows], acols))
  mismatched = [r for r in fit if r["cycles"] != r["analytic_cycles"]]
  from lacax.hw import tools  # pylint: disable=g-import-not-at-top
  return {
      "rows": rows,
      "ablation": ablation_rows,
      "summaries": {m: {s: {k: v for k, v in d.items()} for s, d in ps.items()} for m, ps in summaries.items()},
      "pareto": [{k: r[k] for k in ("design", "cycles", "cells", "flip_flops", "depth", "fitness")} for r in front],
      "workload": workload.to_json(), "space": {k: list(v) for k, v in space.items()},
      "search": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.search.items()},
      "proposer": proposer.name, "backend": backend.describe() if backend is not None else None,
      "sampling": sampling.to_json(), "evaluations_simulated": evaluator.computed,
      "cycles_equal_analytic": not mismatched, "cycles_mismatch_examples": mismatched[:3],
      "tool_versions": tools.versions(), "plot_errors": {k: v for k, v in plot_errors.items() if v},
      "wall_s": time.monotonic() - t0,
  }
