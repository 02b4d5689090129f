"""The `act` job: select ACT heads on calibration splits, then compare accuracy with and without ACT.

  python -m experiments.run --config=configs/act.py:cpu

1. Tasks: offline generated ones (`lacax.act.tasks.OFFLINE_TASKS`) and/or the reference's data sets from local
   JSONL (`tasks.data_dir`), each with a calibration and an evaluation split.
2. Heads: read from `act.heads_path`, or searched on the pooled calibration splits only (`lacax.act.search`,
   `search.mode` "independent" = reference, "greedy", or "both" from one sweep); each selection is written to
   `<run_dir>/heads_<mode>.json` (loadable with `--config.act.heads_path=...`).
3. Evaluation split of every task scored without ACT and with each selection (static head set: the deployment
   path), with an exact McNemar test on the paired outcomes. Table on stdout, everything in results.json.
4. Plots: the attention map of a calibrated head before / after calibration with the sink scores
   (`attention_<layer>_<head>.png`), and the single-head sweep (`sweep.png`).

Every head-set evaluation of the search (each candidate head, each greedy step) is a unit of the run directory
(`lacax.runs`): a resumed search re-reads the evaluations already done and computes only the rest.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import ml_collections
import numpy as np

from lacax import errors
from lacax import io as lacax_io
from lacax import jobs
from lacax import runs
from lacax.act import calibration
from lacax.act import search as search_lib
from lacax.act import tasks as tasks_lib
from lacax.eval import zero_shot
from lacax.weights import loader


def _names(value: str | tuple | list) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in value]


def _indices(value: str, field: str) -> list[int] | None:
  """'' -> None (default); '2:29' -> range; '0,3,5' -> list."""
  value = str(value).strip()
  if not value:
    return None
  try:
    if ":" in value:
      start, stop = value.split(":", 1)
      return list(range(int(start), int(stop)))
    return [int(v) for v in value.split(",")]
  except ValueError:
    raise ValueError(f"{field}={value!r} must be '', 'start:stop' or a comma-separated list of ints") from None


def build_tasks(config: ml_collections.ConfigDict) -> list[tasks_lib.Task]:
  """The configured tasks: offline names are generated, reference names read from `tasks.data_dir`."""
  c = config.tasks
  scoring = c.mc_scoring or None
  tasks = []
  for name in _names(c.names):
    if name in tasks_lib.OFFLINE_TASKS:
      kind = tasks_lib.OFFLINE_TASKS[name][0]
      tasks.append(tasks_lib.offline_task(name, num_calibration=c.num_calibration, num_evaluation=c.num_evaluation,
                                          seed=c.seed, scoring=scoring if kind == "multiple_choice" else None))
    elif name in tasks_lib.CLASSIFICATION_FORMATS or name in tasks_lib.MULTIPLE_CHOICE_FORMATS:
      if not c.data_dir:
        raise ValueError(f"tasks.names has reference data set {name!r} but tasks.data_dir is empty; it needs "
                         f"<data_dir>/{name}/train.jsonl and the evaluation split's JSONL")
      kind = "classification" if name in tasks_lib.CLASSIFICATION_FORMATS else "multiple_choice"
      tasks.append(tasks_lib.load_reference_task(
          name, c.data_dir, num_calibration=c.num_calibration, num_evaluation=c.num_evaluation, seed=c.seed,
          scoring=scoring if kind == "multiple_choice" else None, strip_trailing_space=c.strip_trailing_space))
    else:
      raise ValueError(f"tasks.names has unknown task {name!r}; offline: {sorted(tasks_lib.OFFLINE_TASKS)}, "
                       f"reference: {sorted(tasks_lib.CLASSIFICATION_FORMATS)} + "
                       f"{sorted(tasks_lib.MULTIPLE_CHOICE_FORMATS)}")
  if not tasks:
    raise ValueError("tasks.names is empty")
  return tasks


def mcnemar_p(base: np.ndarray, act: np.ndarray) -> float:
  """Exact two-sided McNemar p-value of paired correct/incorrect outcomes (binomial on discordant pairs)."""
  gained = int(np.sum(~base & act))
  lost = int(np.sum(base & ~act))
  n = gained + lost
  if n == 0:
    return 1.0
  k = min(gained, lost)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
  return min(1.0, 2.0 * tail)


def _compare(base: np.ndarray, calibrated: np.ndarray) -> dict[str, Any]:
  """Paired comparison of per-example correctness without / with ACT."""
  return {"accuracy_act": float(calibrated.mean()), "delta": float(calibrated.mean() - base.mean()),
          "gained": int(np.sum(~base & calibrated)), "lost": int(np.sum(base & ~calibrated)),
          "mcnemar_p": mcnemar_p(base, calibrated)}


def _settings_json(act: calibration.ACTConfig) -> dict[str, Any]:
  return {"beta": act.beta, "threshold_mode": act.threshold_mode, "threshold": act.threshold, "alpha": act.alpha,
          "first_row": act.first_row}


def _plot_attention(path: str, before: np.ndarray, act: calibration.ACTConfig, labels: list[str], title: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.colors as mcolors  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  length = before.shape[-1]
  visible = np.tril(np.ones((length, length), bool))
  after = np.asarray(calibration.calibrate_probs(before, visible, act))
  score_before = np.asarray(calibration.sink_scores(before, visible)[0])
  sinks = np.asarray(calibration.hidden_sinks(before, visible, act))
  score_after = np.asarray(calibration.sink_scores(after, visible)[0])
  fig, axes = plt.subplots(2, 2, figsize=(13, 9), gridspec_kw={"height_ratios": [3, 1]}, layout="constrained")
  norm = mcolors.PowerNorm(0.4, vmin=0.0, vmax=1.0)
  for ax, probs, name in ((axes[0, 0], before, "before"), (axes[0, 1], after, "after ACT")):
    image = ax.imshow(probs, cmap="viridis", norm=norm)
    ax.set_title(f"{title}: {name}")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.7, label="attention (power-law colour scale)")
  x = np.arange(length)
  for ax, score, name in ((axes[1, 0], score_before, "before"), (axes[1, 1], score_after, "after ACT")):
    ax.bar(x, score, color=np.where(sinks, "tab:red", "tab:blue"))
    if act.threshold_mode == "absolute":
      ax.axhline(act.threshold, color="k", lw=0.8, ls="--")
    ax.set_title(f"mean attention received ({name}); red = hidden sinks")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def _plot_sweep(path: str, result: search_lib.SearchResult, shape: tuple[int, int]):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  gain = np.full(shape, np.nan)
  for (layer, head), count in result.single.items():
    gain[layer, head] = (count - result.baseline) / max(result.total, 1) * 100
  limit = max(np.nanmax(np.abs(gain)) if np.isfinite(gain).any() else 1.0, 1e-3)
  fig, ax = plt.subplots(figsize=(6, 8))
  cmap = plt.get_cmap("RdBu").copy()
  cmap.set_bad("lightgrey")
  image = ax.imshow(np.ma.masked_invalid(gain), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
  for layer, head in result.heads:
    ax.plot(head, layer, "k*", ms=6)
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.set_title("calibration accuracy change, one head calibrated (pts)\n* = selected; grey = not evaluated")
  fig.colorbar(image, ax=ax)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def stored_evaluator(evaluate: search_lib.Evaluate, run_dir: runs.RunDir) -> search_lib.Evaluate:
  """`evaluate` whose result for each head set is a unit of `run_dir` (computed once, across resumes)."""

  def stored(select: np.ndarray) -> int:
    heads = sorted((int(l), int(h)) for l, h in np.argwhere(np.asarray(select) > 0))
    key = "act-eval-" + ("none" if not heads else "+".join(f"{l}.{h}" for l, h in heads))
    return int(run_dir.unit(key, lambda: int(evaluate(select))))

  return stored


def validate(config: ml_collections.ConfigDict) -> None:
  """Task names, reference data files, search fields, the heads file and the model path: every problem in one
  `ValidationError`, before the model is loaded."""
  problems = errors.Problems()
  c = config.tasks
  names = _names(c.names)
  problems.check(bool(names), "tasks.names is empty")
  for name in names:
    if name in tasks_lib.OFFLINE_TASKS:
      continue
    fmt = tasks_lib.CLASSIFICATION_FORMATS.get(name) or tasks_lib.MULTIPLE_CHOICE_FORMATS.get(name)
    if fmt is None:
      problems.add(f"tasks.names has unknown task {name!r}; offline: {sorted(tasks_lib.OFFLINE_TASKS)}, reference: "
                   f"{sorted(tasks_lib.CLASSIFICATION_FORMATS)} + {sorted(tasks_lib.MULTIPLE_CHOICE_FORMATS)}")
    elif not c.data_dir:
      problems.add(f"tasks.names has reference data set {name!r} but tasks.data_dir is empty")
    else:
      for split in ("train", fmt.evaluation_split):
        problem = lacax_io.check_readable(os.path.join(c.data_dir, name, f"{split}.jsonl"), f"{name} {split} file")
        problems.check(problem is None, problem or "")
  if not config.act.heads_path:
    problems.check(config.search.mode in (*search_lib.MODES, "both"),
                   f"search.mode={config.search.mode!r} is not supported; expected one of {search_lib.MODES} or "
                   "'both'")
    for field in ("layers", "heads"):
      try:
        _indices(config.search[field], f"search.{field}")
      except ValueError as e:
        problems.add(str(e))
  else:
    problem = lacax_io.check_readable(config.act.heads_path, "act.heads_path")
    problems.check(problem is None, problem or "")
  problems.extend(loader.model_path_problems(config.model.path, "model.path"))
  problems.raise_if_any("act config")


def run(config: ml_collections.ConfigDict, run_dir: str | runs.RunDir) -> dict[str, Any]:
  start = time.perf_counter()
  validate(config)
  run_dir = runs.as_run_dir(run_dir)
  model = jobs.model_from_config(config)
  if model.tokenizer is None:
    raise ValueError(f"model.path={config.model.path!r} has no tokenizer; the act job needs one")
  cfg, params, tok = model.cfg, model.params, model.tokenizer
  shape = (cfg.num_layers, cfg.num_heads)
  a = config.act
  settings = calibration.ACTConfig(beta=a.beta, threshold_mode=a.threshold_mode, threshold=a.threshold,
                                   alpha=a.alpha, first_row=a.first_row)
  tasks = build_tasks(config)
  encode = lambda examples: zero_shot.encode_split(examples, tok, batch_size=config.batch_size,
                                                   bucket=config.bucket)
  calibration_splits = [encode(t.calibration) for t in tasks]
  evaluation_splits = [encode(t.evaluation) for t in tasks]
  total_calibration = sum(len(s.examples) for s in calibration_splits)

  # --- heads ---------------------------------------------------------------------------------------------------
  # selections: label -> (heads, correct on the calibration pool or None).
  selections: dict[str, tuple[frozenset, int | None]] = {}
  result, search_json = None, None
  if a.heads_path:
    selections["loaded"] = (calibration.load_heads(a.heads_path, *shape), None)
  else:
    if total_calibration == 0:
      raise ValueError("tasks.num_calibration=0 and no act.heads_path: nothing to select heads on")
    s = config.search
    if s.mode not in (*search_lib.MODES, "both"):
      raise ValueError(f"search.mode={s.mode!r} is not supported; expected one of {search_lib.MODES} or 'both'")
    candidates = search_lib.candidate_heads(*shape, layers=_indices(s.layers, "search.layers"),
                                            heads=_indices(s.heads, "search.heads"))
    activity = None
    if s.prune or s.max_candidates:
      activity = search_lib.head_activity(params, cfg, calibration_splits, settings)
    evaluate = stored_evaluator(search_lib.model_evaluator(params, cfg, calibration_splits, settings), run_dir)
    sweep_start = time.perf_counter()
    result = search_lib.search_heads(evaluate, shape, candidates, total=total_calibration,
                                     mode="independent" if s.mode == "both" else s.mode, min_gain=s.min_gain,
                                     activity=activity, max_candidates=s.max_candidates or None, progress=True)
    selections[result.mode] = (result.heads, result.combined)
    search_json = result.to_json()
    if s.mode == "both":
      heads, combined, trace = search_lib.select_greedy(evaluate, shape, result.single, result.baseline,
                                                        s.min_gain, progress=True)
      selections["greedy"] = (heads, combined)
      search_json["greedy"] = {"heads": sorted([list(h) for h in heads]), "combined_correct": combined,
                               "trace": trace}
    search_json["seconds"] = time.perf_counter() - sweep_start
    search_json["candidates"] = len(candidates)
    if activity is not None:
      search_json["activity"] = np.round(activity, 5).tolist()
  for label, (heads, combined) in selections.items():
    calibration.save_heads(run_dir.file(f"heads_{label}.json"), heads, *shape,
                           act=_settings_json(settings), selection=label, calibration_correct=combined,
                           calibration_baseline=None if result is None else result.baseline,
                           calibration_total=total_calibration)

  # --- evaluation ----------------------------------------------------------------------------------------------
  per_task: dict[str, dict[str, Any]] = {}
  pooled: dict[str, list[np.ndarray]] = {"base": [], **{label: [] for label in selections}}
  for task, split in zip(tasks, evaluation_splits):
    if not split.examples:
      continue
    base = zero_shot.correct(params, cfg, split)
    pooled["base"].append(base)
    entry = {"kind": task.kind, "scoring": split.examples[0].scoring, "chance": task.chance,
             "num_calibration": len(task.calibration), "num_evaluation": len(split.examples),
             "accuracy": float(base.mean())}
    for label, (heads, _) in selections.items():
      act = settings.replace(heads=heads)
      calibrated = zero_shot.correct(params, cfg, split, act=act) if heads else base
      pooled[label].append(calibrated)
      entry[label] = _compare(base, calibrated)
    per_task[task.name] = entry
  if pooled["base"]:
    base = np.concatenate(pooled["base"])
    per_task["ALL"] = {"num_evaluation": int(base.size), "accuracy": float(base.mean()),
                       **{label: _compare(base, np.concatenate(pooled[label])) for label in selections}}

  header = f"{'task':<16}{'n':>6}{'chance':>8}{'base':>8}"
  for label in selections:
    header += f"{'ACT ' + label:>16}{'d(pt)':>7}{'+/-':>9}{'p':>7}"
  lines = [header, "-" * len(header)]
  for name, r in per_task.items():
    chance = f"{r['chance']:.3f}" if "chance" in r else ""
    line = f"{name:<16}{r['num_evaluation']:>6}{chance:>8}{r['accuracy']:>8.3f}"
    for label in selections:
      c = r[label]
      line += f"{c['accuracy_act']:>16.3f}{100 * c['delta']:>+7.1f}{'+%d/-%d' % (c['gained'], c['lost']):>9}"
      line += f"{c['mcnemar_p']:>7.3f}"
    lines.append(line)
  table = "\n".join(lines)
  parts = []
  for label, (heads, combined) in selections.items():
    part = f"{label}: {len(heads)} heads {sorted(heads)}"
    if result is not None:
      after = combined if combined is not None else result.baseline
      part += f", calibration pool {result.baseline}/{total_calibration} -> {after}/{total_calibration}"
    parts.append(part)
  summary = "ACT " + "; ".join(parts)
  print(f"\n{summary}\n{table}\n")
  logging.info("act: %s", summary)

  # --- plots -----------------------------------------------------------------------------------------------------
  plots = []
  if config.plot.enabled:
    if result is not None and result.single:
      if runs.safe_plot("sweep.png", _plot_sweep, run_dir.file("sweep.png"), result, shape) is None:
        plots.append("sweep.png")
    task_index = next((i for i, t in enumerate(tasks) if t.name == config.plot.task), 0)
    examples = tasks[task_index].evaluation or tasks[task_index].calibration
    if examples:
      ids = tok.encode(examples[min(config.plot.example, len(examples) - 1)].prompt)
      maps = calibration.attention_maps(params, cfg, ids)
      heads = next(iter(selections.values()))[0]
      if heads and result is not None:
        layer, head = max(heads, key=lambda h: (result.single.get(h, 0), h))
      elif heads:
        layer, head = min(heads)
      else:  # nothing selected: show the head on which ACT would move the most mass
        visible = np.tril(np.ones(maps.shape[-2:], bool))
        moved = np.asarray(calibration.freed_mass(maps, visible, settings)).sum(-1)
        layer, head = np.unravel_index(np.argmax(moved), moved.shape)
      labels = [tok.decode([i], skip_special_tokens=False).replace("\n", "\\n") for i in ids]
      name = f"attention_{layer}_{head}.png"
      if runs.safe_plot(name, _plot_attention, run_dir.file(name), maps[layer, head], settings, labels,
                        f"layer {layer} head {head}") is None:
        plots.append(name)

  return {
      "table": table, "summary": summary, "tasks": per_task,
      "selections": {label: sorted([list(h) for h in heads]) for label, (heads, _) in selections.items()},
      "act": _settings_json(settings),
      "search": search_json, "plots": plots, "model": cfg.name, "seconds": time.perf_counter() - start,
      "model_fingerprint": model.fingerprint(),
  }
