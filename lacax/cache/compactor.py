"""Compactor (Chari & Van Durme, arXiv 2507.08143): approximate key leverage blended with non-causal chunked
attention, with sinks at both ends.

Reference NVIDIA/kvpress `presses/compactor_press.py::CompactorPress.score`, per (layer, row, KV head) over the
held tokens in order (the prompt at the prefill hand-off):

  1. the first `sink_size_start` (8) and the last `sink_size_end` (4) tokens are kept (kvpress pads their
     scores with the largest score; lacax ranks them first, which differs only when the budget is smaller than
     the sinks plus one);
  2. on the tokens between them: l = z-normalised leverage of the pre-RoPE keys (`lacax.cache.scoring.leverage`, a
     Gaussian sketch of `sketch_dimension` columns, centred over these tokens) and a = NonCausalAttn's score
     (`lacax.cache.noncausal`, chunks of `chunk_size` counted from the first token after the sinks);
  3. score = blending * l + a.

`blending=None` is kvpress's default, the press's compression ratio. lacax's budget is a token count, so it
uses 1 - budget / n for a row of n held tokens (kvpress: the ratio it was given, whose kept count is
int(n * (1 - ratio)); the two can differ by less than 1 / n). The sketch is drawn from `seed` (kvpress: an
unseeded `torch.randn` per call), so the leverage term cannot be compared token for token with kvpress; with
`blending=0` the two keep the same tokens (the parity test). Prefill-only in kvpress; `during_decode=True`
rescores the held tokens with their recorded queries at every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache, StatsRecording
from lacax.cache.scoring import HeldSequence, attention_scores, gaussian_sketch, leverage, sequence_inputs, zscore


@dataclasses.dataclass(frozen=True)
class CompactorPolicy(ScorerPolicy):
  """Compactor: the `budget` tokens of every (layer, row, KV head) by blended leverage + chunked attention.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    sink_size_start: first tokens always kept (8, kvpress).
    sink_size_end: last tokens always kept (4, kvpress).
    chunk_size: tokens per non-causal attention chunk (256, kvpress).
    sketch_dimension: columns of the leverage's Gaussian sketch (48, kvpress).
    blending: weight of the leverage term; None (kvpress) = the row's compression ratio 1 - budget / n.
    seed: PRNG seed of the sketch.
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  sink_size_start: int = 8
  sink_size_end: int = 4
  chunk_size: int = 256
  sketch_dimension: int = 48
  blending: float | None = None
  seed: int = 0
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("Compactor")
    plans.check_int("Compactor", "sink_size_start", self.sink_size_start, 0)
    plans.check_int("Compactor", "sink_size_end", self.sink_size_end, 0)
    plans.check_int("Compactor", "chunk_size", self.chunk_size, 1)
    plans.check_int("Compactor", "sketch_dimension", self.sketch_dimension, 1)
    plans.check_int("Compactor", "seed", self.seed, 0)
    if self.blending is not None:
      plans.check_number("Compactor", "blending", self.blending, 0)

  @property
  def name(self) -> str:
    return "compactor"

  @property
  def sink_tokens(self) -> int:
    return self.sink_size_start

  @property
  def stats_recording(self) -> StatsRecording:
    return StatsRecording(queries=True)

  def score(self, cache: KVCache) -> jax.Array:
    inv_freq = self.inv_freq(cache)
    n = jnp.max(plans.occupancy(cache), axis=-1)  # [L, B]
    # kvpress: left = min(start, n), right = min(end, max(0, n - left)); static here, so short rows (n below
    # the sinks) are not compressed anyway (n <= budget) or keep their sinks first.
    seq = HeldSequence.of(cache, self.sink_size_start, self.sink_size_end, self.chunk_size)
    q, k, v = sequence_inputs(cache, inv_freq, seq)
    scored = seq.scored
    attn = attention_scores(q, k, v, scored, self.chunk_size)
    pre = seq.take(plans.head_major(plans.scoring_keys(cache, "pre_rope", inv_freq)))
    sketch = gaussian_sketch(jax.random.PRNGKey(self.seed), pre.shape[:3], pre.shape[-1], self.sketch_dimension)
    lev = zscore(leverage(pre, scored, sketch), scored, axes=(-2, -1))
    if self.blending is None:
      blending = (1.0 - self.budget / jnp.maximum(n, 1).astype(jnp.float32))[:, :, None, None]
    else:
      blending = self.blending
    return seq.to_slots(jnp.where(scored, blending * lev + attn, 0.0))

