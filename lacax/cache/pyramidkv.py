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


BUDGET_RULES = ("kvcache_factory", "kvpress")


def kvpress_pyramid_budgets(num_layers: int, capacity: int, window: int, beta: int, prompt_len) -> jax.Array:
  """NVIDIA/kvpress's PyramidKV budgets, as prefix tokens kept besides the window (window-inclusive totals).

  Reference `kvpress/presses/pyramidkv_press.py::PyramidKVPress.get_layer_budget`, where a press of
  compression ratio r on a P-token prompt has max_capacity_prompt = w + P (1 - r). lacax's `capacity` here is
  the mean tokens a layer keeps *window included*, c = P (1 - r) (kvpress's count for a uniform press), so:

    min = c / beta, max = 2c - min; if max >= P - w: max = P - w, min = 2c - max
    if not (P >= max >= min >= w): every layer keeps round(c) = c tokens
    else: layer l keeps round(max - l (max - min) / (L - 1)) tokens, the window included

  i.e. the same pyramid as KVCache-Factory's (`pyramid_budgets`) but on c instead of c - w and with the window
  counted inside each layer's total (KVCache-Factory keeps the window on top of its budget). Arithmetic is
  float32 with round-half-to-even (Python's `round`); kvpress computes in float64, so a total that lands
  within float32 rounding of a .5 may differ by one. Prompts no longer than `capacity` are left alone (lacax's
  fixed-budget convention; kvpress always applies its ratio).

  Returns:
    [num_layers] (int P) or [num_layers, B] int32 prefix budgets (total - window, >= 0).
  """
  p = jnp.asarray(prompt_len, jnp.float32)
  c = float(capacity)
  min0 = c / beta
  capped = 2 * c - min0 >= p - window
  max_num = jnp.where(capped, p - window, 2 * c - min0)
  min_num = jnp.where(capped, 2 * c - max_num, min0)
  ok = (p >= max_num) & (max_num >= min_num) & (min_num >= window)
  layer = jnp.arange(num_layers, dtype=jnp.float32).reshape((num_layers,) + (1,) * p.ndim)
  steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else jnp.zeros_like(max_num)
  total = jnp.where(ok, jnp.round(max_num - layer * steps), c).astype(jnp.int32)
  p_int = jnp.asarray(prompt_len, jnp.int32)
  return jnp.where(p_int <= capacity, jnp.maximum(p_int - window, 0), jnp.maximum(total - window, 0))


@dataclasses.dataclass(frozen=True)
class PyramidKVPolicy(WindowScoredPolicy):
  """PyramidKV: SnapKV scoring with per-layer budgets running linearly from layer 0 (largest) to the top.

  Reference Zefan-Cai/KVCache-Factory `pyramidkv/pyramidkv_utils.py::PyramidKVCluster.update_kv`; the budgets
  are `pyramid_budgets` (prefix tokens kept besides the window, mean ~ capacity - window). Every layer holds
  the same static number of slots, so layers with smaller budgets leave empty slots (pos -1) after their kept
  tokens: the memory is that of the largest layer, as in any static-shape implementation.

  Attributes: as `SnapKVPolicy`, plus
    beta: the pyramid's steepness: the smallest budget is (capacity - window) // beta (20 in the reference).
    budget_rule: "kvcache_factory" (default, the reference above: `pyramid_budgets`, the window kept on top of
      each layer's budget, mean ~ capacity) or "kvpress" (NVIDIA/kvpress's window-inclusive rule:
      `kvpress_pyramid_budgets`, mean ~ capacity with the window counted inside; kvpress's ratio r on a
      P-token prompt is capacity = P (1 - r)).
  """

  capacity: int
  window: int = 32
  kernel: int = 7
  pooling: str = "avg"
  beta: int = 20
  score_agg: str = "mean"
  rope_mode: str = "original"
  max_new_tokens: int | None = None
  lean_decode: bool = True
  budget_rule: str = "kvcache_factory"

  def __post_init__(self):
    self._validate("PyramidKV")
    plans.check_int("PyramidKV", "beta", self.beta, 1)
    if self.budget_rule not in BUDGET_RULES:
      raise ValueError(f"PyramidKV budget_rule={self.budget_rule!r} must be one of {list(BUDGET_RULES)}")

  def max_kept(self) -> int:
    if self.budget_rule == "kvpress":
      # Layer 0's total round(2c - c / beta) <= 2c - c // beta (window included; c = capacity).
      return max(2 * self.capacity - self.capacity // self.beta, self.capacity)
    # Layer 0's budget, 2c - c // beta, is the largest of every branch (c = capacity - window).
    c = self.capacity - self.window
    return 2 * c - c // self.beta + self.window

  def prefix_budget(self, num_layers: int, prompt_len: jax.Array) -> jax.Array:
    rule = kvpress_pyramid_budgets if self.budget_rule == "kvpress" else pyramid_budgets
    return rule(num_layers, self.capacity, self.window, self.beta, prompt_len)
