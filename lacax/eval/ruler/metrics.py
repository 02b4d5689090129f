"""RULER's official scoring (NVIDIA/RULER `scripts/eval/synthetic/constants.py`, `scripts/eval/evaluate.py`).

  string_match_all   NIAH, variable tracking, common / frequent words: per sample, the fraction of the gold
                     strings that occur (case-insensitively) in the prediction; the mean over samples, x100,
                     rounded to 2 decimals;
  string_match_part  QA: per sample, 1 when any gold string occurs in the prediction; the mean, x100, rounded.

Predictions are first `postprocess_pred`: stripped, every control character (\\x00-\\x1f) replaced by "\\n",
stripped again. The task average is unweighted over tasks, as RULER's summary table.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
  """RULER's `postprocess_pred`: strip, control characters -> "\\n", strip."""
  return _NON_PRINTABLE.sub("\n", prediction.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
  if len(preds) != len(refs):
    raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
  if not preds:
    raise ValueError("no predictions to score")
  for i, ref in enumerate(refs):
    if isinstance(ref, str) or not ref:
      raise ValueError(f"references[{i}]={ref!r} must be a non-empty list of gold strings")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
  """sum_i (|{r in refs_i : r.lower() in pred_i.lower()}| / |refs_i|) / n * 100, rounded to 2 decimals."""
  _check(preds, refs)
  score = sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
              for p, ref in zip(preds, refs)) / len(preds) * 100
  return round(score, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
  """sum_i max_{r in refs_i} [r.lower() in pred_i.lower()] / n * 100, rounded to 2 decimals."""
  _check(preds, refs)
  hits = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs))
  score = hits / len(preds) * 100
  return round(score, 2)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def sample_match(prediction: str, refs: Sequence[str], metric: str) -> float:
  """One sample's score in [0, 1] under `metric` (before the x100 and the rounding), for per-sample records."""
  p = postprocess_pred(prediction).lower()
  hits = [r.lower() in p for r in refs]
  if metric == "string_match_all":
    return sum(hits) / len(refs)
  if metric == "string_match_part":
    return float(any(hits))
  raise ValueError(f"metric={metric!r} must be one of {sorted(METRICS)}")


def score_task(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """The official score (0-100) of one task: its metric over the post-processed predictions."""
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r} must be one of {sorted(METRICS)}")
  return METRICS[metric]([postprocess_pred(p) for p in predictions], references)


def average(scores: Mapping[str, float]) -> float:
  """The unweighted mean over tasks (RULER's summary)."""
  if not scores:
    raise ValueError("no task scores to average")
  return sum(scores.values()) / len(scores)
