"""Offline head selection for ACT: which (layer, head) pairs to calibrate.

The reference (GATECH-EIC/ACT `scripts/calibration.sh` + `main.py --calibrate 1`) calibrates one head at a
time on a pooled calibration set (900 training examples per task, shuffled together), logs the accuracy, and
keeps the heads whose calibration alone raises it; the kept lists are then hard-coded and all calibrated at once
(`models/augment_index.py`). Its sweep covers layers 2 .. L-2 (2..30 of Llama-2-7B's 32 layers).

Here the sweep is one compiled program: the head set is a *traced* [layers, heads] input of the probs hook
(`calibration.make_traced_probs_hook`), so each candidate is a new one-hot array, not a recompilation.

* `mode="independent"` (reference): keep every head whose single-head accuracy beats the baseline by at least
  `min_gain` examples (1 = "raises accuracy"); the combined set is evaluated once and reported, not re-checked.
* `mode="greedy"`: the individually helpful heads, best first, join the set only while the *combined* set keeps
  improving by at least `min_gain` examples.

Pruning (exact): a head on which ACT finds no hidden sink for any calibration query is the identity there, so its
single-head accuracy equals the baseline; `head_activity` measures the attention mass ACT would move per head in
one uncalibrated pass, and heads with none are not evaluated. `max_candidates` optionally keeps only the most
active heads (an approximation, for small budgets; off by default).

The model-independent functions take `evaluate(select [layers, heads] float32 numpy) -> number correct`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax.eval import zero_shot
from lacax.act.calibration import ACTConfig, freed_mass, record_attention
from lacax.model.config import ModelConfig

MODES = ("independent", "greedy")
Head = tuple[int, int]
Evaluate = Callable[[np.ndarray], int]


@dataclasses.dataclass
class SearchResult:
  """What a head search measured.

  Attributes:
    heads: the selected (layer, head) pairs.
    mode: "independent" or "greedy".
    total: examples in the calibration pool.
    baseline: correct without ACT.
    single: correct with each evaluated head calibrated alone.
    pruned: candidates not evaluated because ACT finds no hidden sink for them on the calibration data (their
      single-head count is exactly the baseline).
    capped: active candidates not evaluated because of `max_candidates`.
    combined: correct with all selected heads calibrated (None when nothing was selected).
    trace: greedy steps: {"head", "correct", "accepted"}.
  """

  heads: frozenset[Head]
  mode: str
  total: int
  baseline: int
  single: dict[Head, int]
  pruned: tuple[Head, ...] = ()
  capped: tuple[Head, ...] = ()
  combined: int | None = None
  trace: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict[str, Any]:
    return {
        "heads": sorted([list(h) for h in self.heads]), "mode": self.mode, "total": self.total,
        "baseline_correct": self.baseline, "combined_correct": self.combined,
        "baseline_accuracy": self.baseline / max(self.total, 1),
        "combined_accuracy": None if self.combined is None else self.combined / max(self.total, 1),
        "single_correct": [[l, h, c] for (l, h), c in sorted(self.single.items())],
        "pruned": [list(h) for h in self.pruned], "capped": [list(h) for h in self.capped], "trace": self.trace,
    }


def reference_layers(num_layers: int) -> tuple[int, ...]:
  """The layers the reference sweeps: 2 .. num_layers - 2 (2..30 for 32 layers)."""
  return tuple(range(2, max(num_layers - 1, 2)))


def candidate_heads(num_layers: int, num_heads: int, layers: Iterable[int] | None = None,
                    heads: Iterable[int] | None = None) -> list[Head]:
  """(layer, head) pairs to sweep, layer-major; layers default to `reference_layers`, heads to all.

  Raises:
    ValueError: a layer or head index is outside the model.
  """
  layers = reference_layers(num_layers) if layers is None else tuple(layers)
  heads = tuple(range(num_heads)) if heads is None else tuple(heads)
  for name, values, limit in (("layer", layers, num_layers), ("head", heads, num_heads)):
    bad = [v for v in values if not 0 <= v < limit]
    if bad:
      raise ValueError(f"candidate {name} indices {bad} are outside [0, {limit})")
  return [(l, h) for l in layers for h in heads]


def one_hot(heads: Iterable[Head], shape: tuple[int, int]) -> np.ndarray:
  """[layers, heads] float32 select array with ones at `heads`."""
  select = np.zeros(shape, np.float32)
  for layer, head in heads:
    select[layer, head] = 1.0
  return select


def _progress(items: Sequence[Any], enabled: bool, desc: str):
  from lacax.progress import ProgressBar  # pylint: disable=g-import-not-at-top

  return ProgressBar.wrap(items, desc, enabled=enabled, unit="head")


def sweep_single_heads(evaluate: Evaluate, shape: tuple[int, int], candidates: Sequence[Head], *,
                       progress: bool = False) -> dict[Head, int]:
  """Correct count with each candidate head calibrated alone."""
  return {head: int(evaluate(one_hot([head], shape))) for head in _progress(candidates, progress, "ACT sweep")}


def select_independent(single: dict[Head, int], baseline: int, min_gain: int = 1) -> frozenset[Head]:
  """The reference rule: heads whose single-head count beats the baseline by >= min_gain examples."""
  return frozenset(h for h, c in single.items() if c - baseline >= min_gain)


def select_greedy(evaluate: Evaluate, shape: tuple[int, int], single: dict[Head, int], baseline: int,
                  min_gain: int = 1, *, progress: bool = False
                  ) -> tuple[frozenset[Head], int | None, list[dict[str, Any]]]:
  """Adds individually helpful heads (best single gain first) while the combined count rises by >= min_gain.

  Returns:
    (selected heads, their combined correct count or None, the trace of every step).
  """
  ranked = sorted((h for h, c in single.items() if c - baseline >= min_gain), key=lambda h: (-single[h], h))
  chosen: list[Head] = []
  best, trace = baseline, []
  for head in _progress(ranked, progress, "ACT greedy"):
    count = int(evaluate(one_hot([*chosen, head], shape)))
    accepted = count - best >= min_gain
    trace.append({"head": list(head), "correct": count, "accepted": accepted})
    if accepted:
      chosen.append(head)
      best = count
  return frozenset(chosen), (best if chosen else None), trace


def search_heads(evaluate: Evaluate, shape: tuple[int, int], candidates: Sequence[Head], *, total: int,
                 mode: str = "independent", min_gain: int = 1, activity: np.ndarray | None = None,
                 max_candidates: int | None = None, progress: bool = False) -> SearchResult:
  """The full offline selection.

  Args:
    evaluate: select [layers, heads] -> number of correct calibration examples.
    shape: (num_layers, num_heads).
    candidates: heads to consider (`candidate_heads`).
    total: number of calibration examples (for accuracies).
    mode: "independent" (reference) or "greedy".
    min_gain: examples a head (or a step) must gain; >= 1.
    activity: optional [layers, heads] mass ACT moves per head (`head_activity`); zero-activity candidates are
      pruned (exact), and with `max_candidates` only the most active are evaluated.
    max_candidates: optional cap on evaluated candidates (by activity).
    progress: show progress bars.

  Raises:
    ValueError: unknown mode, min_gain < 1, or max_candidates without activity.
  """
  if mode not in MODES:
    raise ValueError(f"search mode={mode!r} is not supported; expected one of {MODES}")
  if min_gain < 1:
    raise ValueError(f"min_gain={min_gain} must be >= 1 (examples gained)")
  if max_candidates is not None and activity is None:
    raise ValueError("max_candidates needs the per-head activity to rank candidates")
  active = list(candidates) if activity is None else [h for h in candidates if activity[h] > 0]
  kept = active
  if max_candidates is not None:
    kept = sorted(sorted(active, key=lambda h: (-float(activity[h]), h))[:max_candidates])
  active_set, kept_set = set(active), set(kept)
  pruned = tuple(h for h in candidates if h not in active_set)
  capped = tuple(h for h in active if h not in kept_set)
  baseline = int(evaluate(np.zeros(shape, np.float32)))
  single = sweep_single_heads(evaluate, shape, kept, progress=progress)
  trace: list[dict[str, Any]] = []
  if mode == "independent":
    heads = select_independent(single, baseline, min_gain)
    combined = int(evaluate(one_hot(heads, shape))) if heads else None
  else:
    heads, combined, trace = select_greedy(evaluate, shape, single, baseline, min_gain, progress=progress)
  return SearchResult(heads=heads, mode=mode, total=total, baseline=baseline, single=single, pruned=pruned,
                      capped=capped, combined=combined, trace=trace)


# --- the model side: evaluate and activity on encoded task splits -------------------------------------------------


def model_evaluator(params: Any, cfg: ModelConfig, splits: Sequence[zero_shot.EncodedSplit],
                    act: ACTConfig) -> Evaluate:
  """evaluate(select) = correct examples over all `splits`, ACT (act's settings) on the selected heads."""
  act = act.replace(heads=frozenset())  # the traced select decides; keep one static config for one compile

  def evaluate(select: np.ndarray) -> int:
    return int(sum(zero_shot.correct(params, cfg, split, act=act, select=select).sum() for split in splits))

  return evaluate


def head_activity(params: Any, cfg: ModelConfig, splits: Sequence[zero_shot.EncodedSplit], act: ACTConfig
                  ) -> np.ndarray:
  """[layers, heads] mean attention mass per real query that ACT would move off hidden sinks (uncalibrated pass).

  A zero entry means the head never has a hidden sink on these prompts: calibrating it alone is the identity.
  The per-layer sums reach the host through `jax.debug.callback`; the jitted pass is built per call so that
  its callback writes into this call's accumulator.
  """
  act = act.replace(heads=frozenset())
  total = np.zeros((cfg.num_layers, cfg.num_heads), np.float64)

  def accumulate(layer: int, value: np.ndarray) -> None:
    total[layer] += value

  def make_hook(visible):
    # Per query head: the mass ACT would move, summed over the batch and the queries.
    reduce = lambda probs: jnp.sum(freed_mass(probs, visible, act), axis=(0, 3)).reshape(-1)
    return record_attention(accumulate, reduce)

  @jax.jit
  def run(params, tokens, lengths):
    return jnp.argmax(zero_shot.prefill_last_logits(params, tokens, lengths, cfg, make_hook), axis=-1)

  queries = 0
  for split in splits:
    for batch in split.batches:
      jax.block_until_ready(run(params, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths)))
      queries += int(batch.lengths[batch.index >= 0].sum())
  jax.effects_barrier()
  return total / max(queries, 1)
