"""Random eviction: the baseline of NVIDIA/kvpress `presses/random_press.py::RandomPress`, seeded.

kvpress scores every token with `torch.rand` (re-seeded with `seed` at every layer, so all layers draw the same
numbers; unseeded by default). lacax draws uniform scores from `jax.random` with `seed` folded with the number of
tokens seen so far (so that decode-time eviction draws afresh at every step), independently per (layer, row,
slot, KV head): the kept set is a deterministic function of the seed and the sequence length, and the same
on every device layout. It cannot reproduce torch's numbers; parity with kvpress is by distribution only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache


def score_heads(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[*shape] float32 uniform [0, 1) scores drawn from the PRNG key (higher = keep)."""
  return jax.random.uniform(key, shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class RandomPolicy(ScorerPolicy):
  """Random: keep `budget` uniformly random tokens of every (layer, row, KV head), reproducibly.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    seed: PRNG seed; the scores of a compaction come from `fold_in(PRNGKey(seed), tokens seen)`.
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  seed: int = 0
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("Random")
    plans.check_int("Random", "seed", self.seed, 0)

  @property
  def name(self) -> str:
    return "random"

  def score(self, cache: KVCache) -> jax.Array:
    seen = jnp.max(cache.pos) + 1  # the same on every layer, row and head
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), seen)
    return score_heads(key, cache.pos.shape)
