"""PyramidKV (arXiv 2406.02069): SnapKV scoring with per-layer budgets shrinking from the bottom layer up.

Reference Zefan-Cai/KVCache-Factory; the scoring and selection shared with SnapKV are
`lacax.cache.base.WindowScoredPolicy`, the conventions of the score-based policies `lacax.cache.plans`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import WindowScoredPolicy


def pyramid_budgets(num_layers: int, capacity: int, window: int, beta: int, prompt_len) -> jax.Array:
  """PyramidKV's per-layer prefix budgets (tokens kept besides the window), as KVCache-Factory computes them.

  Reference `pyramidkv/pyramidkv_utils.py::PyramidKVCluster.update_kv`, with P = prompt length, w = window,
  c = capacity - w:

    min = c // beta, max = 2c - min; if max >= P - w: max = P - w, min = 2c - max
    steps = (max - min) // (num_layers - 1); budget(layer) = max - layer * steps
    P < capacity:      no compression (every prefix token kept; here: budget = P - w, clipped at 0)
    P < 2c:            the uniform SnapKV budget c for every layer (the reference's middle branch)
    otherwise:         budget(layer), layer 0 largest, linear down to ~min

  The mean budget is c + ((max - min) mod (num_layers - 1)) / 2, i.e. c up to integer rounding. With one layer
  the reference divides by zero; here that layer gets c.

  Args:
    num_layers, capacity, window, beta: static ints.
    prompt_len: int or [B] int array P.

  Returns:
    [num_layers] (int P) or [num_layers, B] int32.
  """
  c = capacity - window
  p = jnp.asarray(prompt_len, jnp.int32)
  min0 = c // beta
  capped = 2 * c - min0 >= p - window
  max_num = jnp.where(capped, p - window, 2 * c - min0)
  min_num = jnp.where(capped, 2 * c - (p - window), min0)
  layer = jnp.arange(num_layers, dtype=jnp.int32).reshape((num_layers,) + (1,) * p.ndim)
  if num_layers > 1:
    pyramid = max_num - layer * ((max_num - min_num) // (num_layers - 1))
  else:
    pyramid = jnp.full(layer.shape, c, jnp.int32)
  budget = jnp.where(p < 2 * c, c, pyramid)
  return jnp.where(p < capacity, jnp.maximum(p - window, 0), budget).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PyramidKVPolicy(WindowScoredPolicy):
  """PyramidKV: SnapKV scoring with per-layer budgets running linearly from layer 0 (largest) to the top.

  Reference Zefan-Cai/KVCache-Factory `pyramidkv/pyramidkv_utils.py::PyramidKVCluster.update_kv`; the budgets
  are `pyramid_budgets` (prefix tokens kept besides the window, mean ~ capacity - window). Every layer holds
  the same static number of slots, so layers with smaller budgets leave empty slots (pos -1) after their kept
  tokens: the memory is that of the largest layer, as in any static-shape implementation.

  Attributes: as `SnapKVPolicy`, plus
    beta: the pyramid's steepness: the smallest budget is (capacity - window) // beta (20 in the reference).
  """

  capacity: int
  window: int = 32
  kernel: int = 7
  pooling: str = "avg"
  beta: int = 20
  score_agg: str = "mean"
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("PyramidKV")
    plans.check_int("PyramidKV", "beta", self.beta, 1)

  def max_kept(self) -> int:
    # Layer 0's budget, 2c - c // beta, is the largest of every branch (c = capacity - window).
    c = self.capacity - self.window
    return 2 * c - c // self.beta + self.window

  def prefix_budget(self, num_layers: int, prompt_len: jax.Array) -> jax.Array:
    return pyramid_budgets(num_layers, self.capacity, self.window, self.beta, prompt_len)
