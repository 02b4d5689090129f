"""MG-Verilog's balanced fine-tuning scheme: which (code, description level) pairs each epoch trains on.

  union           every (record, level) pair once per epoch, shuffled: each code appears once per level and
                  each level is 1/L of the data (the reference code, `dataset_utils.merge_dataset`)
  random_level    every record once per epoch with a level drawn uniformly among its levels (the paper:
                  "randomly select training samples of different description levels in each iteration")
  weighted        as random_level, with the level drawn by `weights` (renormalised over a record's levels)
  single:<level>  the single-level baselines: every record that has <level>, once per epoch

The sampler is host-side and seeded: `epoch(e)` is a pure function of (seed, e).
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

from lacax.hw.mg_verilog.records import LEVELS, Record

BASE_MODES = ("union", "random_level", "weighted")


def parse_mode(mode: str) -> tuple[str, str | None]:
  if mode in BASE_MODES:
    return mode, None
  if mode.startswith("single:") and mode[len("single:"):] in LEVELS:
    return "single", mode[len("single:"):]
  raise ValueError(f"mode={mode!r} must be one of {BASE_MODES} or single:<level> with level in {LEVELS}")


class BalancedSampler:
  """Epochs of (record index, level) pairs over `records` in one of the modes above.

  Args:
    records: the records (each with its available levels).
    mode: "union", "random_level", "weighted" or "single:<level>".
    levels: the levels to use (default: all four, restricted to those a record has).
    weights: {level: weight} for "weighted".
    seed: the shuffling / drawing seed.
  """

  def __init__(self, records: Sequence[Record], mode: str = "union", levels: Sequence[str] = LEVELS,
               weights: Mapping[str, float] | None = None, seed: int = 0):
    self.kind, self.single = parse_mode(mode)
    self.mode = mode
    bad = [l for l in levels if l not in LEVELS]
    if bad:
      raise ValueError(f"levels={list(levels)!r}: {bad} not in {LEVELS}")
    self.levels = tuple(levels)
    if self.kind == "weighted":
      if not weights or any(w < 0 for w in weights.values()) or not any(weights.get(l, 0) > 0 for l in levels):
        raise ValueError(f"weights={weights!r} must give non-negative weights, some positive, over {levels}")
      self.weights = {l: float(weights.get(l, 0.0)) for l in self.levels}
    else:
      self.weights = {l: 1.0 for l in self.levels}
    self.records = list(records)
    self.available = [tuple(l for l in self.levels if r.has(l)) for r in self.records]
    if not any(self.available):
      raise ValueError(f"no record has any of the levels {self.levels}")
    self.seed = seed

  def epoch(self, e: int = 0) -> list[tuple[int, str]]:
    rng = random.Random(f"balanced/{self.seed}/{self.mode}/{e}")
    pairs: list[tuple[int, str]] = []
    for i, avail in enumerate(self.available):
      if self.kind == "union":
        pairs += [(i, l) for l in avail]
      elif self.kind == "single":
        if self.single in avail:
          pairs.append((i, self.single))
      else:
        ws = [self.weights[l] for l in avail]
        if avail and sum(ws) > 0:
          pairs.append((i, rng.choices(avail, weights=ws)[0]))
    rng.shuffle(pairs)
    return pairs

  def __len__(self) -> int:
    return len(self.epoch(0))
