"""AdaKV (arXiv 2407.11550): head-adaptive budgets over any scorer policy.

Reference NVIDIA/kvpress `kvpress/presses/adakv_press.py::AdaKVPress` (the AdaKV authors' own port). The inner
policy scores the tokens (`keep_scores`); each layer keeps `budget` tokens per kv head *on average*: every head
first keeps its `alpha_safeguard * budget` best tokens (at least one), then the layer's remaining budget goes
to the best-scored tokens of all its heads together, so heads whose attention is concentrated give slots to
heads whose attention is spread.

Memory. kvpress cannot shorten a head it does not shorten the others by: it keeps the whole cache and masks the
evicted keys with "fake keys" whose exp(q.k) is 0 (`attention_patch.py`), so AdaKV there saves no memory.
lacax's cache has one static slot axis per layer shared by the kv heads: each head's kept tokens are packed to
the front and the cache is cut to the largest head's count, which AdaKV bounds by
KV * budget - (KV - 1) * n_safe (the other heads keep at least their safeguard). So memory is saved against
the full prompt, but a layer costs up to that bound rather than `budget` slots per head (the price of a
rectangular cache; a ragged/paged layout would save the rest). Attention ignores the empty slots.
"""

from __future__ import annotations

import dataclasses

import jax

from lacax.cache import plans
from lacax.cache.base import CachePolicy, HeadAdaptiveWrapper
from lacax.cache.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class AdaKVPolicy(HeadAdaptiveWrapper):
  """AdaKV: `budget` tokens per kv head on average, allocated across the heads of a layer by score.

  Per (layer, row), with n = budget and KV kv heads (kvpress `AdaKVPress.compress`):
    n_safe = max(1, int(n * alpha_safeguard)) (0 when alpha_safeguard = 0);
    every head keeps its n_safe best tokens and the inner policy's protected ones (window, recent, sinks);
    the KV * n kept tokens of the layer are those and the best-scored of all the heads' other tokens.
  Ties go to the older token, then to the lower head (kvpress's `torch.topk` leaves ties unspecified).

  It compresses when a layer holds more than KV * n tokens: in the prefill hand-off for a prompt compressor
  inner policy (SnapKV, PyramidKV: kvpress's setting), at every decode step for a decode-time one (H2O, TOVA).
  An inner policy must protect at most `budget` tokens per head (the registry builds it at the same budget).

  Attributes:
    inner: the scorer policy (e.g. `SnapKVPolicy`); its own budget is not used, its scores and protection are.
    budget: mean tokens kept per kv head (kvpress: k_len * (1 - compression_ratio)).
    alpha_safeguard: fraction of the budget every head keeps by its own ranking (0.2 in kvpress), in [0, 1].
  """

  inner: CachePolicy
  budget: int
  alpha_safeguard: float = 0.2

  def __post_init__(self):
    self._check_inner("AdaKV")
    plans.check_int("AdaKV", "budget", self.budget, 1)
    plans.check_number("AdaKV", "alpha_safeguard", self.alpha_safeguard, 0, 1)

  def keep_mask(self, cache: KVCache) -> jax.Array:
    scores, protected = self.inner.keep_scores(cache)
    return plans.head_adaptive_keep(scores, protected, cache.valid(), self.budget, self.n_safe)[1]
