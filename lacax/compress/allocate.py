"""Per-layer sparsity and bit-width allocation from measured sensitivities (Edge-LLM LUC).

Sparsity (the reference's `get_pruning_schedular`): one sensitivity number per layer (the mean of its row of
the prune table), transformed by `mode` (ordinary: as is; sqrt; square), min-max normalised to s_hat in [0, 1],
then

  s_l = T * L * (1 - s_hat_l) / sum_k (1 - s_hat_k)

so the mean is exactly T and sparsity is non-increasing in sensitivity (the most sensitive layer gets 0). lacax
adds clipping to [s_min, s_max] with a water-filling redistribution: layers that hit a bound are fixed there and
the remaining sparsity is spread over the others in proportion to (1 - s_hat), until none violates a bound; the
mean stays exactly T (up to float64 rounding) and the order is kept.

Bits: a layer whose quantization sensitivity (its row of the quant table at `base_bits`) is above the mean over
layers gets `high_bits`, the others `base_bits` (the paper's rule; the reference hard-codes its choice).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lacax.errors import ConfigError

MODES = ("ordinary", "sqrt", "square")


def layer_scores(table_rows: np.ndarray) -> np.ndarray:
  """One sensitivity per layer: the mean over candidates of its row ([L, candidates] -> [L])."""
  rows = np.asarray(table_rows, np.float64)
  if rows.ndim != 2:
    raise ValueError(f"sensitivity rows have shape {rows.shape}; expected [layers, candidates]")
  return rows.mean(axis=1)


def allocate_sparsity(sensitivity: Sequence[float], target: float, *, mode: str = "ordinary",
                      s_min: float = 0.0, s_max: float = 1.0) -> np.ndarray:
  """Per-layer sparsities [L] (float64) with mean `target` (module docstring)."""
  sens = np.asarray(sensitivity, np.float64)
  if sens.ndim != 1 or sens.size == 0 or not np.all(np.isfinite(sens)):
    raise ConfigError(f"sensitivity={sens.tolist()}: expected a non-empty list of finite numbers")
  if mode not in MODES:
    raise ConfigError(f"allocation mode={mode!r}; expected one of {list(MODES)}")
  if not 0.0 <= s_min <= target <= s_max <= 1.0:
    raise ConfigError(f"target sparsity={target} with s_min={s_min}, s_max={s_max}: expected "
                      "0 <= s_min <= target <= s_max <= 1")
  if mode == "sqrt":
    sens = np.sqrt(np.maximum(sens, 0.0))
  elif mode == "square":
    sens = sens ** 2
  span = sens.max() - sens.min()
  s_hat = (sens - sens.min()) / span if span > 0 else np.zeros_like(sens)
  weight = 1.0 - s_hat
  L = sens.size
  total = target * L
  out = np.zeros(L)
  free = np.ones(L, bool)
  for _ in range(L + 1):
    remaining = total - out[~free].sum()
    w_free = weight[free].sum()
    if w_free > 0:
      out[free] = remaining * weight[free] / w_free
    else:  # every free layer is as sensitive as the most sensitive one: share evenly
      out[free] = remaining / free.sum()
    low = free & (out < s_min)
    high = free & (out > s_max)
    if not low.any() and not high.any():
      break
    # Fix the side that is violated more in total; the other side may resolve after redistribution.
    if (s_min - out[low]).sum() >= (out[high] - s_max).sum():
      out[low], free[low] = s_min, False
    else:
      out[high], free[high] = s_max, False
    if not free.any():
      break
  return out


def allocate_bits(quant_sensitivity: Sequence[float], *, base_bits: int = 4, high_bits: int = 8) -> np.ndarray:
  """Per-layer weight bits [L] int: `high_bits` where the sensitivity is above the mean, else `base_bits`."""
  sens = np.asarray(quant_sensitivity, np.float64)
  if sens.ndim != 1 or sens.size == 0:
    raise ConfigError(f"quantization sensitivity={sens.tolist()}: expected a non-empty list")
  if high_bits < base_bits:
    raise ConfigError(f"high_bits={high_bits} < base_bits={base_bits}")
  return np.where(sens > sens.mean(), high_bits, base_bits).astype(np.int64)
