"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

pass@k = E_problems[1 - C(n - c, k) / C(n, k)] for n samples of which c pass. Computed exactly with integers
(`fractions.Fraction`), then as a float; k > n is undefined (None), as in human-eval and VerilogEval, which
skip it. VerilogEval v2's summary truncates each problem's rate to a whole percent; lacax does not.
"""

from __future__ import annotations

import fractions
import math
from typing import Iterable, Sequence


def pass_at_k_exact(n: int, c: int, k: int) -> fractions.Fraction | None:
  """1 - C(n-c, k) / C(n, k) as a Fraction; None when k > n."""
  if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
    raise TypeError(f"n={n!r}, c={c!r}, k={k!r} must be integers")
  if n < 1 or not 0 <= c <= n or k < 1:
    raise ValueError(f"need n >= 1, 0 <= c <= n, k >= 1; got n={n}, c={c}, k={k}")
  if k > n:
    return None
  return 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))


def pass_at_k(n: int, c: int, k: int) -> float | None:
  """The unbiased estimate for one problem (float); None when k > n."""
  exact = pass_at_k_exact(n, c, k)
  return None if exact is None else float(exact)


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float | None:
  """The mean over problems of pass@k from (n, c) pairs; None when k exceeds some problem's n or no problem."""
  vals = [pass_at_k_exact(n, c, k) for n, c in counts]
  if not vals or any(v is None for v in vals):
    return None
  return float(sum(vals) / len(vals))


def summary(counts: Sequence[tuple[int, int]], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """{"pass@k": value} for every k that no problem's n is below."""
  out = {}
  for k in ks:
    v = mean_pass_at_k(counts, k)
    if v is not None:
      out[f"pass@{k}"] = v
  return out
