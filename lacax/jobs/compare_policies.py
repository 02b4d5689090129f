"""A leaderboard: any set of cache policies at several budgets on one task, score against budget per policy.

The shape of kvpress's leaderboard (one score per press and compression ratio, RULER-4k averages), over
lacax's own task runners: the comparison job builds, for every (policy, budget), the config of the task's own
job (`config.job`, a `configs/<task>.py` config: passkey, niah, ruler, streaming perplexity or LongBench from a
path) with `policies = (policy,)` and that budget, and calls that job's `run(config, run_dir, model=...)` with
the model loaded once. Nothing of the tasks is re-implemented here.

Budgets are fractions: of the prompt (passkey / NIAH / RULER, `cache.budget`), of `max_length` (LongBench,
its protocol's `cache.budget`), or of the streamed tokens (streaming perplexity: `cache.size =
int(budget * num_tokens)`). The full cache has no budget: it runs once and is drawn as a horizontal line.

Each (policy, budget) is a unit of the run directory (`lacax.runs`): the task job runs in its own directory
`runs/<policy>-b<budget>/` (so its own units resume too) and its score is stored as the unit; a resumed run
skips finished pairs. Writes the leaderboard table (stdout), `results.json` and `leaderboard.png`.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Callable

import ml_collections
import numpy as np

from lacax import jobs
from lacax import errors
from lacax import runs
from lacax.cache import registry


def _passkey_score(figure):
  return 100 * figure["mean"]


def _decode_speed(figure):
  """Decoded tokens per second where the task job reports them (RULER, streaming perplexity)."""
  for key in ("decode_tokens_per_second", "tokens_per_second"):
    if key in figure:
      return float(figure[key])
  return None


# task -> (job module, metric name, higher is better, score(figure), how the budget is applied)
TASKS: dict[str, tuple[str, str, bool, Callable[[dict], float], str]] = {
    "passkey": ("passkey", "pass rate (%)", True, _passkey_score, "budget"),
    "niah": ("niah", "pass rate (%)", True, _passkey_score, "budget"),
    "ruler": ("ruler", "RULER score (0-100)", True, lambda f: float(f["mean"]), "budget"),
    "streaming": ("lacache", "perplexity", False, lambda f: float(f["ppl"]), "size"),
    "longbench": ("longbench", "LongBench average", True, lambda f: float(f["scores"]["average_score"]), "budget"),
}


def _job(task: str):
  return importlib.import_module(f"lacax.jobs.{TASKS[task][0]}")


def _budget_label(budget: float | None) -> str:
  return "full" if budget is None else f"{budget:g}"


def task_config(config: ml_collections.ConfigDict, policy: str, budget: float | None) -> ml_collections.ConfigDict:
  """The task job's config for one (policy, budget): `config.job` with `policies=(policy,)` and the budget."""
  sub = ml_collections.ConfigDict(config.job.to_dict())
  sub.policies = (policy,)
  sub.model.path, sub.model.dtype = config.model.path, config.model.dtype
  if budget is not None:
    if TASKS[config.task][4] == "size":
      sub.cache.size = max(1, int(budget * sub.num_tokens))
    else:
      sub.cache.budget = float(budget)
  return sub


def _pairs(config) -> list[tuple[str, float | None]]:
  pairs = []
  for policy in config.policies:
    if not registry.POLICIES[policy].budgeted:  # the full cache: one run, no budget
      pairs.append((policy, None))
    else:
      pairs.extend((policy, float(b)) for b in config.budgets)
  return pairs


def _field_problems(config: ml_collections.ConfigDict) -> list[str]:
  problems = errors.Problems()
  problems.check(config.task in TASKS, f"task={config.task!r} must be one of {list(TASKS)}")
  problems.check(len(config.policies) > 0, "policies is empty: expected names such as ('full', 'snapkv', 'tova')")
  for name in config.policies:
    problems.check(name in registry.POLICIES, f"policies contains {name!r}; expected names from "
                   f"{sorted(registry.POLICIES)}")
  problems.check(len(set(config.policies)) == len(config.policies), f"policies={tuple(config.policies)!r} has "
                 "duplicates")
  budgets = tuple(config.budgets)
  problems.check(len(budgets) > 0 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b <= 1
                                          for b in budgets),
                 f"budgets={budgets!r} must be a non-empty tuple of fractions in (0, 1]")
  problems.check(len(set(budgets)) == len(budgets), f"budgets={budgets!r} has duplicates")
  if config.task in TASKS:
    problems.check(config.job.experiment == TASKS[config.task][0],
                   f"job.experiment={config.job.experiment!r} is not the {config.task!r} job "
                   f"({TASKS[config.task][0]!r}); build the config with configs/compare_policies.py:{config.task}")
  return problems.messages


def validate_config(config: ml_collections.ConfigDict) -> None:
  problems = errors.Problems()
  problems.extend(_field_problems(config))
  problems.raise_if_any(f"{config.experiment} config")


def validate(config: ml_collections.ConfigDict) -> None:
  """The comparison's own fields, then the task job's `validate` at every budget (all policies at once), so
  that a wrong data path or a policy the model cannot run is reported before anything is loaded."""
  problems = errors.Problems()
  problems.extend(_field_problems(config))
  if not problems:
    job = _job(config.task)
    for budget in config.budgets:
      sub = task_config(config, config.policies[0], budget)
      sub.policies = tuple(config.policies)
      try:
        job.validate(sub)
      except errors.ValidationError as e:
        problems.extend(f"budget {budget:g}: {m}" for m in e.problems)
        break
  problems.raise_if_any(f"{config.experiment} config")


def format_leaderboard(rows: list[dict[str, Any]], budgets, metric: str) -> str:
  width = max([12] + [len(r["policy"]) + 2 for r in rows])
  header = f"{'rank':<5}{'policy':<{width}}" + "".join(f"{'@' + format(b, 'g'):>10}" for b in budgets) + \
      f"{'mean':>10}" + "".join(f"{'tok/s@' + format(b, 'g'):>12}" for b in budgets)
  lines = [metric, header]
  for rank, row in enumerate(rows, 1):
    scores = [row["scores"].get(_budget_label(b), row["scores"].get("full")) for b in budgets]
    speeds = [row["decode_tokens_per_second"].get(_budget_label(b), row["decode_tokens_per_second"].get("full"))
              for b in budgets]
    lines.append(f"{rank:<5}{row['policy']:<{width}}" + "".join(f"{s:>10.2f}" for s in scores) + f"{row['mean']:>10.2f}" +
                 "".join(f"{v:>12.1f}" if v is not None else f"{'-':>12}" for v in speeds))
  return "\n".join(lines)


def plot_leaderboard(scores: dict[str, dict[str, float]], budgets, path: str, title: str, metric: str) -> None:
  """Score against budget, one line per policy; the full cache as a dashed horizontal line."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  xs = sorted(budgets)
  for name, by_budget in scores.items():
    if "full" in by_budget:
      ax.axhline(by_budget["full"], color="black", linestyle="--", linewidth=1, label=f"{name} (no budget)")
    else:
      ax.plot(xs, [by_budget[_budget_label(b)] for b in xs], marker="o", label=name)
  ax.set_xlabel("cache budget (fraction kept)")
  ax.set_ylabel(metric)
  ax.set_xticks(xs, [format(b, "g") for b in xs])
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, run_dir: str | runs.RunDir, *, model=None) -> dict[str, Any]:
  """Runs the task job for every (policy, budget); prints the leaderboard, writes `leaderboard.png`."""
  if model is None:
    validate(config)
  else:
    validate_config(config)
  run_dir = runs.as_run_dir(run_dir)
  model = model or jobs.model_from_config(config)
  job = _job(config.task)
  _, metric, higher, score_of, _ = TASKS[config.task]
  scores: dict[str, dict[str, float]] = {p: {} for p in config.policies}
  speeds: dict[str, dict[str, float | None]] = {p: {} for p in config.policies}
  figures: dict[str, dict[str, Any]] = {p: {} for p in config.policies}
  for policy, budget in _pairs(config):
    label = _budget_label(budget)

    def compute(policy=policy, budget=budget, label=label):
      sub_dir = runs.RunDir(run_dir.file("runs", f"{policy}-b{label}"))
      out = job.run(task_config(config, policy, budget), sub_dir, model=model)
      figure = out["figures"][policy]
      return {"score": score_of(figure), "decode_tokens_per_second": _decode_speed(figure), "figure": figure}

    unit = run_dir.unit(f"compare-{policy}-b{label}", compute)
    scores[policy][label] = unit["score"]
    speeds[policy][label] = unit["decode_tokens_per_second"]
    figures[policy][label] = unit["figure"]
    logging.info("%s @ %s: %s %.3f", policy, label, metric, unit["score"])

  rows = []
  for policy in config.policies:
    values = list(scores[policy].values())
    rows.append({"policy": policy, "scores": scores[policy], "decode_tokens_per_second": speeds[policy],
                 "mean": float(np.mean(values))})
  rows.sort(key=lambda r: -r["mean"] if higher else r["mean"])
  budgets = tuple(float(b) for b in config.budgets)
  print(f"\nLeaderboard: {config.task} on {model.cfg.name}, budgets {', '.join(format(b, 'g') for b in budgets)} "
        f"({'higher' if higher else 'lower'} is better)")
  print(format_leaderboard(rows, budgets, metric))
  out = {"task": config.task, "metric": metric, "higher_is_better": higher, "budgets": list(budgets),
         "leaderboard": rows, "figures": figures, "model": model.cfg.name, "model_fingerprint": model.fingerprint()}
  plot_path = run_dir.file("leaderboard.png")
  plot_error = runs.safe_plot("leaderboard.png", plot_leaderboard, scores, budgets, plot_path,
                              f"{config.task}: {model.cfg.name}", metric)
  print(f"plot: {plot_path}" if plot_error is None else f"plot failed: {plot_error}")
  if plot_error is not None:
    out["plot_errors"] = {"leaderboard.png": plot_error}
  bad = [r["policy"] for r in rows if not math.isfinite(r["mean"])]
  if bad:
    out["errors"] = {"non_finite": bad}
  return out
