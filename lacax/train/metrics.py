"""Training metrics on disk: one JSON object per line (`metrics.jsonl`) and a loss-curve plot.

A resumed run first truncates the file to the records at or before the step it resumes from (rewritten
atomically), so the file of a run that was killed and resumed reads as the uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping


def _jsonable(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends records to `path` (JSONL)."""

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if resume_step is not None and os.path.exists(path):
      kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        for r in kept:
          f.write(json.dumps(r) + "\n")
      os.replace(tmp, path)
    elif resume_step is None and os.path.exists(path):
      os.remove(path)

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
      f.flush()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics file (a torn last line, from a kill mid-write, is skipped)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def plot_loss_curve(records: list[Mapping[str, Any]], path: str, title: str = "training loss") -> str | None:
  """Train (and eval) loss against step, saved to `path` (PNG); None if there is nothing to plot."""
  train = [(r["step"], r["loss"]) for r in records if "loss" in r and isinstance(r["loss"], (int, float))]
  evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
  if not train and not evals:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  if train:
    ax.plot(*zip(*train), label="train", lw=1.2)
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval", ms=3)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return path
