"""LeverageScore (Chari & Van Durme, arXiv 2507.08143): keep the keys of largest approximate statistical leverage.

Reference NVIDIA/kvpress `presses/leverage_press.py::LeverageScorePress`, per (layer, row, KV head) over the
held tokens: centre the pre-RoPE keys over the sequence, sketch them on the right with a Gaussian matrix
Phi [D, k] / sqrt(k) (k = `sketch_dimension`, 48), X = centred @ Phi; the leverage of token i is
x_i^T (X^T X + jitter I)^-1 x_i (through a Cholesky factor, as kvpress, whose first attempt uses jitter
1e-2), clamped at 0;
the scores are then z-normalised.

Departures, both forced by determinism and batching: kvpress draws Phi with unseeded `torch.randn` per call
(lacax: `jax.random` from `seed`, one matrix per (layer, row, KV head); `score_heads` takes Phi explicitly so a
parity test can pass torch's); kvpress z-normalises over the whole (batch, heads, seq) tensor, lacax over the
(heads, seq) of each (layer, row) (the same at batch 1; a per-row affine map, so it changes no per-head
ranking, only how scores compare across heads for head-adaptive wrappers). kvpress retries the Cholesky with
a larger jitter on failure; lacax's fixed jitter 1e-2 on a Gram matrix of unit-scaled sketches is positive
definite. kvpress supports prefill only; `during_decode=True` rescores the held tokens at every step.
"""

from __future__ import annotations

import dataclasses

import jax

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache
# The shared leverage helpers, re-exported under this module as before (tests and callers use these names).
from lacax.cache.scoring import cholesky, forward_substitute, gaussian_sketch, leverage, zscore  # noqa: F401


def score_heads(keys: jax.Array, valid: jax.Array, sketch: jax.Array) -> jax.Array:
  """keys [B, KV, S, D] pre-RoPE, valid [B, KV, S], sketch [B, KV, D, k] -> [B, KV, S] z-scored leverage
  (normalised over the heads and slots of each row; any leading axes before B are kept apart too)."""
  return zscore(leverage(keys, valid, sketch), valid, axes=(-2, -1))


@dataclasses.dataclass(frozen=True)
class LeverageScorePolicy(ScorerPolicy):
  """LeverageScore: the `budget` keys of every (layer, row, KV head) with the largest sketched leverage.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    sketch_dimension: columns k of the Gaussian sketch (48 in kvpress).
    seed: PRNG seed of the sketch.
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  sketch_dimension: int = 48
  seed: int = 0
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("LeverageScore")
    plans.check_int("LeverageScore", "sketch_dimension", self.sketch_dimension, 1)
    plans.check_int("LeverageScore", "seed", self.seed, 0)

  @property
  def name(self) -> str:
    return "leverage"

  def score(self, cache: KVCache) -> jax.Array:
    keys = plans.head_major(plans.scoring_keys(cache, "pre_rope", self.inv_freq(cache)))
    sketch = gaussian_sketch(jax.random.PRNGKey(self.seed), keys.shape[:3], keys.shape[-1], self.sketch_dimension)
    return plans.slot_major(score_heads(keys, plans.head_major(cache.valid()), sketch))
