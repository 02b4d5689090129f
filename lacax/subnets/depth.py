"""Depth: which decoder blocks a subnet of depth d keeps.

The AmoebaLLM reference (GATECH-EIC/AmoebaLLM, `main.py`, the `--layer_calib_dp` block; arXiv 2411.10606
"knowledge-preserving layer selection") fills a dynamic-programming table over the candidate layers:

  * the last `keep_last` layers (K, default 1) are never removed; the candidates are the first N = L - K;
  * at most M = L - `min_layers` layers are removed;
  * candidates are scanned from the deepest (N - 1) towards layer 0; D[n][m] is the best calibration metric
    with m of the first n scanned candidates removed and S[n][m] its keep-mask;
  * for 1 <= m <= min(n, M): take S[n-1][m-1], also remove layer N - n, evaluate once; adopt it only if it is
    *strictly* better than D[n-1][m] (ties keep the layer); with m == n removal is forced;
  * cost: sum_n min(n, M) calibration evaluations (306 for LLaMA-2-7B with K = 1, M = 12).

`strategy[m]` (m = number of removed layers) is then the keep-mask of depth L - m, with `strategy[0]` all ones.
The masks of different depths are not nested (a depth-20 and a depth-21 subnet may use different layers).

Baselines (same `DepthStrategy` type, so every consumer takes any of them): dropping the last m candidates,
uniform (evenly spaced) dropping, and ShortGPT block influence (arXiv 2403.03853: remove the layers whose
output is most similar to their input, BI_l = 1 - E_t cos(x_l, x_{l+1})).

Strategies are saved as JSON (no pickle), with the model they were computed for, so that a file made for
another model is refused when loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Mask = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DepthStrategy:
  """Keep-masks of every depth a subnet may have.

  Attributes:
    num_layers: L, layers of the full model.
    keep_last: K, the deepest layers that are never removed.
    max_removed: M, the largest number of removed layers in `strategy`.
    strategy: m -> length-L 0/1 keep-mask with exactly m zeros, for m = 0..M.
    metric: m -> calibration metric of `strategy[m]` (NaN where not measured, e.g. m = 0 or a baseline).
    higher_is_better: the metric's direction (accuracy: True; loss/perplexity: False).
    method: "dp", "last", "uniform", "block_influence" or a user label.
    num_evaluations: calibration evaluations the selection cost.
    model: a description of the model it was computed for (`model_signature`), checked on load.
  """

  num_layers: int
  keep_last: int
  max_removed: int
  strategy: Mapping[int, Mask]
  metric: Mapping[int, float]
  higher_is_better: bool = False
  method: str = "dp"
  num_evaluations: int = 0
  model: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for m, mask in self.strategy.items():
      if len(mask) != self.num_layers:
        raise ValueError(f"DepthStrategy.strategy[{m}] has {len(mask)} entries; expected num_layers={self.num_layers}")
      if sum(1 for v in mask if not v) != m:
        raise ValueError(f"DepthStrategy.strategy[{m}]={mask} removes {mask.count(0)} layers; expected {m}")
    if 0 not in self.strategy:
      object.__setattr__(self, "strategy", {0: (1,) * self.num_layers, **self.strategy})

  @property
  def min_depth(self) -> int:
    return self.num_layers - self.max_removed

  @property
  def depths(self) -> tuple[int, ...]:
    """Every depth the strategy has a mask for, largest first."""
    return tuple(sorted((self.num_layers - m for m in self.strategy), reverse=True))

  def mask(self, depth: int) -> Mask:
    """The keep-mask of a subnet with `depth` layers (`strategy[L - depth]`)."""
    if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool):
      raise TypeError(f"depth={depth!r} must be an integer")
    m = self.num_layers - int(depth)
    if m not in self.strategy:
      raise ValueError(f"depth={depth} is out of range: this {self.method} strategy has depths "
                       f"{self.min_depth}..{self.num_layers} (num_layers={self.num_layers}, "
                       f"max_removed={self.max_removed})")
    return tuple(self.strategy[m])

  def to_json(self) -> dict[str, Any]:
    return {"num_layers": self.num_layers, "keep_last": self.keep_last, "max_removed": self.max_removed,
            "strategy": {str(m): list(v) for m, v in sorted(self.strategy.items())},
            "metric": {str(m): (None if v is None or math.isnan(v) else float(v)) for m, v in sorted(self.metric.items())},
            "higher_is_better": self.higher_is_better, "method": self.method,
            "num_evaluations": self.num_evaluations, "model": dict(self.model)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "DepthStrategy":
    return cls(num_layers=int(data["num_layers"]), keep_last=int(data["keep_last"]),
               max_removed=int(data["max_removed"]),
               strategy={int(m): tuple(int(x) for x in v) for m, v in data["strategy"].items()},
               metric={int(m): (math.nan if v is None else float(v)) for m, v in data["metric"].items()},
               higher_is_better=bool(data["higher_is_better"]), method=str(data["method"]),
               num_evaluations=int(data["num_evaluations"]), model=dict(data.get("model", {})))

  def save(self, path: str) -> str:
    """Writes the strategy as JSON (atomically)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f, indent=1)
    os.replace(tmp, path)
    return path


def model_signature(cfg) -> dict[str, Any]:
  """What identifies the model a selection artefact belongs to (name and layer shapes)."""
  return {"name": cfg.name, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
          "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "intermediate_size": cfg.intermediate_size}


def check_signature(saved: Mapping[str, Any], cfg, path: str) -> None:
  """Raises a ValueError naming the file and the first field in which `saved` differs from `cfg`'s model."""
  if not saved:
    return
  want = model_signature(cfg)
  for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "name"):
    if key in saved and saved[key] != want[key]:
      raise ValueError(f"{path} was made for another model: {key}={saved[key]!r} there, but the model has "
                       f"{key}={want[key]!r} (model {want['name']!r})")


def load_strategy(path: str, cfg=None) -> DepthStrategy:
  """Reads a strategy written by `DepthStrategy.save`; with `cfg`, refuses one made for another model."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"depth strategy file {path!r} does not exist")
  try:
    with open(path) as f:
      data = json.load(f)
    strategy = DepthStrategy.from_json(data)
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is not a lacax depth strategy file ({type(e).__name__}: {e})") from None
  if cfg is not None:
    check_signature(strategy.model, cfg, path)
  return strategy


def _check_range(num_layers: int, keep_last: int, max_removed: int) -> None:
  if num_layers < 1:
    raise ValueError(f"num_layers={num_layers} must be >= 1")
  if not 0 <= keep_last <= num_layers:
    raise ValueError(f"keep_last={keep_last} must be in [0, num_layers={num_layers}]")
  if not 0 <= max_removed <= num_layers - keep_last:
    raise ValueError(f"max_removed={max_removed} must be in [0, num_layers - keep_last = {num_layers - keep_last}] "
                     f"(num_layers={num_layers}, keep_last={keep_last})")


def _better(a: float, b: float, higher_is_better: bool) -> bool:
  return a > b if higher_is_better else a < b


def dp_evaluation_count(num_layers: int, keep_last: int, max_removed: int) -> int:
  """sum_{n=1..N} min(n, M): the calibration evaluations of `dp_layer_selection`."""
  n_cand = num_layers - keep_last
  return sum(min(n, max_removed) for n in range(1, n_cand + 1))


def dp_layer_selection(evaluate: Callable[[np.ndarray], float], num_layers: int, *, min_layers: int,
                       keep_last: int = 1, higher_is_better: bool = False,
                       progress: Callable[[int, int], None] | None = None,
                       model: Mapping[str, Any] | None = None) -> DepthStrategy:
  """The reference DP layer selection (see the module docstring).

  Args:
    evaluate: keep-mask [L] int32 (1 = layer runs) -> calibration metric (a Python float); called
      `dp_evaluation_count(L, keep_last, L - min_layers)` times, never with the all-ones mask.
    num_layers: L.
    min_layers: the smallest depth (M = L - min_layers).
    keep_last: K, the deepest layers never removed (reference default 1).
    higher_is_better: True for accuracies, False for losses and perplexities.
    progress: optional callback(evaluations done, total).
    model: `model_signature(cfg)` to store with the strategy.

  Returns:
    The `DepthStrategy` with `strategy[m]` = S[N][m] and `metric[m]` = D[N][m] for m = 1..M.
  """
  max_removed = num_layers - min_layers
  _check_range(num_layers, keep_last, max_removed)
  n_cand = num_layers - keep_last
  worst = -math.inf if higher_is_better else math.inf
  total = dp_evaluation_count(num_layers, keep_last, max_removed)
  # Row n-1 of the table: D_prev[m], S_prev[m] for m = 0..M.
  d_prev = [worst] * (max_removed + 1)
  s_prev: list[np.ndarray | None] = [np.ones(num_layers, np.int32)] + [None] * max_removed
  done = 0
  for n in range(1, n_cand + 1):
    layer = n_cand - n
    d_cur, s_cur = list(d_prev), list(s_prev)
    for m in range(1, min(n, max_removed) + 1):
      candidate = s_prev[m - 1].copy()
      candidate[layer] = 0
      value = float(evaluate(candidate))
      done += 1
      if progress is not None:
        progress(done, total)
      if s_prev[m] is None or _better(value, d_prev[m], higher_is_better):  # strict: ties keep the layer
        d_cur[m], s_cur[m] = value, candidate
    d_prev, s_prev = d_cur, s_cur
  strategy = {m: tuple(int(v) for v in s_prev[m]) for m in range(1, max_removed + 1)}
  metric = {m: d_prev[m] for m in range(1, max_removed + 1)}
  return DepthStrategy(num_layers=num_layers, keep_last=keep_last, max_removed=max_removed, strategy=strategy,
                       metric=metric, higher_is_better=higher_is_better, method="dp", num_evaluations=done,
                       model=dict(model or {}))


def _from_removals(num_layers: int, keep_last: int, max_removed: int, removals: Callable[[int], Sequence[int]],
                   method: str, model: Mapping[str, Any] | None) -> DepthStrategy:
  _check_range(num_layers, keep_last, max_removed)
  strategy = {}
  for m in range(1, max_removed + 1):
    mask = np.ones(num_layers, np.int32)
    mask[list(removals(m))] = 0
    strategy[m] = tuple(int(v) for v in mask)
  return DepthStrategy(num_layers=num_layers, keep_last=keep_last, max_removed=max_removed, strategy=strategy,
                       metric={m: math.nan for m in strategy}, method=method, model=dict(model or {}))


def drop_last_strategy(num_layers: int, *, min_layers: int, keep_last: int = 1,
                       model: Mapping[str, Any] | None = None) -> DepthStrategy:
  """Removes the m deepest candidates (the DP's own m-th diagonal S[m][m])."""
  n_cand = num_layers - keep_last
  return _from_removals(num_layers, keep_last, num_layers - min_layers, lambda m: range(n_cand - m, n_cand),
                        "last", model)


def uniform_removals(n_cand: int, m: int) -> list[int]:
  """m candidate indices spread evenly over [0, n_cand): the centres of m equal segments ("every k-th")."""
  return sorted({int((i + 0.5) * n_cand / m) for i in range(m)}) if m else []


def uniform_strategy(num_layers: int, *, min_layers: int, keep_last: int = 1,
                     model: Mapping[str, Any] | None = None) -> DepthStrategy:
  """Uniform layer dropping: m evenly spaced candidates removed (every (N/m)-th layer)."""
  n_cand = num_layers - keep_last
  return _from_removals(num_layers, keep_last, num_layers - min_layers, lambda m: uniform_removals(n_cand, m),
                        "uniform", model)


def block_influence(hidden: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """ShortGPT's Block Influence of every layer, BI_l = 1 - mean_t cos(x_l[t], x_{l+1}[t]).

  Args:
    hidden: [L + 1, ..., D] the residual stream before layer 0, between layers and after the last layer.
    valid: optional [...] bool, the tokens to average over (padding excluded).

  Returns:
    [L] float64 block influence (small = the block changes its input little).
  """
  h = np.asarray(hidden, np.float64)
  x, y = h[:-1], h[1:]
  cos = np.sum(x * y, axis=-1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-30)
  cos = cos.reshape(cos.shape[0], -1)
  if valid is None:
    return 1.0 - cos.mean(axis=1)
  w = np.asarray(valid, np.float64).reshape(-1)
  return 1.0 - (cos * w).sum(axis=1) / max(w.sum(), 1.0)


def block_influence_strategy(influence: np.ndarray, *, min_layers: int, keep_last: int = 1,
                             model: Mapping[str, Any] | None = None) -> DepthStrategy:
  """ShortGPT layer removal: the m candidates of lowest block influence (ties: the deeper layer first)."""
  influence = np.asarray(influence, np.float64)
  num_layers = influence.shape[0]
  n_cand = num_layers - keep_last
  order = sorted(range(n_cand), key=lambda i: (influence[i], -i))
  return _from_removals(num_layers, keep_last, num_layers - min_layers, lambda m: order[:m], "block_influence",
                        model)
