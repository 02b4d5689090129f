"""NonCausalAttn (Chari & Van Durme, arXiv 2507.08143): keep the keys the prompt's own queries attend to most,
within non-causal chunks.

Reference NVIDIA/kvpress `presses/non_causal_attention_press.py::NonCausalAttnPress`, per (layer, row, KV head)
over the held tokens in order (the "sequence", the prompt at the prefill hand-off):

  1. the sequence is cut into chunks of `chunk_size`; in each chunk every query attends to every key of the
     chunk, before as well as after it (no causal mask), with logits q . k (post-RoPE, **not** divided by
     sqrt(head_dim), as the reference), softmax in float32;
  2. a key's attention is the sum over the chunk's queries, averaged over the query heads of its KV head;
  3. score = attention * ||v||_2, 1-D average-pooled (kernel 3, zero padding counted: `F.avg_pool1d(x, 3,
     padding=1)`), then z-normalised (unbiased std, clamped at 1e-6).

The reference's padding of the last chunk is reproduced: it pads the sequence with zero queries and keys to a
whole chunk, sets the padded query rows' logits to 0 and the padded key columns' to -1e-9 (not -inf). So the
real queries of a short last chunk also weigh `pad` zero-logit keys, and every padded query row spreads about
1/chunk_size of attention over the chunk's keys; lacax computes the same numbers (`lacax.cache.scoring.chunked_column_sums`).

lacax reads the prompt's queries from the forward (`StatsRecording(queries=True)`, pre-RoPE, at each token's
slot; rotated here at the token's original position, as a Hugging Face cache holds them) and drops them at the
prefill hand-off. Differences: kvpress z-normalises over the whole (batch, heads, seq) tensor, lacax over the
(heads, seq) of each (layer, row) (the same at batch 1); kvpress is prefill-only (`during_decode=True` rescores
the held tokens with their recorded queries at every step, and then keeps recording).
"""

from __future__ import annotations

import dataclasses

import jax

from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache, StatsRecording
from lacax.cache.scoring import HeldSequence, attention_scores, sequence_inputs


@dataclasses.dataclass(frozen=True)
class NonCausalAttnPolicy(ScorerPolicy):
  """NonCausalAttn: the `budget` tokens of every (layer, row, KV head) most attended within non-causal chunks.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    chunk_size: tokens per non-causal chunk (256, kvpress).
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  chunk_size: int = 256
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("NonCausalAttn")
    plans.check_int("NonCausalAttn", "chunk_size", self.chunk_size, 1)

  @property
  def name(self) -> str:
    return "noncausal"

  @property
  def stats_recording(self) -> StatsRecording:
    return StatsRecording(queries=True)

  def score(self, cache: KVCache) -> jax.Array:
    seq = HeldSequence.of(cache, 0, 0, self.chunk_size)
    q, k, v = sequence_inputs(cache, self.inv_freq(cache), seq)
    return seq.to_slots(attention_scores(q, k, v, seq.scored, self.chunk_size))

