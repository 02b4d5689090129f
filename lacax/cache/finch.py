"""Finch (Corallo & Papotti, TACL 2024): prompt-guided compression, the question's attention choosing the context.

Reference NVIDIA/kvpress `presses/finch_press.py::FinchPress`. The prompt is context + question; the question's
queries are the observation window (SnapKV-style, `score` / `compress`):

  * each window query's attention row over the whole prompt (causal softmax) is cut to the context's columns
    and, with `normalize_scores` (default), multiplied by the query's index t in the prompt (kvpress's
    `non_zero_counts`, arange(k_len - w, k_len)): later queries, whose attention is spread over more keys,
    count more;
  * the rows are averaged over the window and over the kv head's query group (lacax: `score_agg`, "mean" as
    kvpress), with no pooling;
  * the window itself gets the top score, and the top int(k_len * (1 - r)) tokens are kept, window included
    (lacax: `capacity` tokens, the window and the capacity - window best context tokens);
  * with `chunk_length`, each chunk of the prompt (window included) keeps its own share of the budget
    (`plans.chunked_keep`, as `lacax.cache.chunk`; kvpress: max(1, int(len_c * (1 - r))) per chunk).

The question. kvpress finds the window from a delimiter token the user places between context and question
(`update_model_and_tokenizer` adds it to the vocabulary; an embedding hook drops it and sets `window_size` to
the number of tokens after it; batch size 1), so its window is the question, whatever its length. lacax has
no tokenizer hook in the forward: the window is the prompt's last `window` tokens, so a caller sets `window`
to the question's length (the prompt is context + question, kvpress's `query_aware=True`); a batch shares the
one static window. The score is the forward's window statistic weighted by the query positions
(`score_mode="window_by_position:W"`, `lacax.cache.kv_cache.ScoreRecording.by_position`), which is kvpress's
sum over the window (w times its mean: the same ranking), for prompts prefilled from position 0.

Key re-rotation. kvpress's default `rerotate_keys=True` moves the kept keys to positions 0..n-1
(`KeyRerotationPress.rerotate_keys`) while its decoding continues at the original length; lacax's default
`rope_mode="original"` keeps keys at their original positions (kvpress's `rerotate_keys=False`: the same kept
tokens); "slot" re-rotates them at their slots and continues there too (see `lacax.cache.key_rerotation`).
Ties go to the older token. With `chunk_length`, kvpress asserts chunk_length > window / (1 - r) (with
1 - r = capacity / P for a P-token prompt: chunk_length * capacity > window * P), so that every chunk's share
can hold the window; lacax refuses the same prompts when a run is sized (`run_capacity`, `check_chunks`, given
the longest prompt), and sizes the decode cache for the kept total, the budget plus at most one (a last short
chunk's max(1, .)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import WindowScoredPolicy, lean_decode_cache
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FinchPolicy(WindowScoredPolicy):
  """Finch: the prompt compressed to `capacity` tokens by its last `window` tokens' (the question's)
  position-normalised attention (see the module docstring).

  Attributes:
    capacity: prompt tokens kept, window included (kvpress: int(k_len * (1 - compression_ratio))); > window.
    window: the question's length in tokens: the prompt's last `window` tokens (kvpress: the tokens after
      its delimiter).
    chunk_length: None (one selection over the prompt, kvpress's default) or the chunk size of chunked
      selection.
    normalize_scores: weight each window query by its position (True, kvpress).
    score_agg: GQA group reduction ("mean", kvpress).
    rope_mode: "original" (kvpress's rerotate_keys=False), "slot" or "stored".
    max_new_tokens: decode tokens the cache must leave room for (None: sized for the whole run).
    lean_decode: the decode cache records nothing (see `WindowScoredPolicy`).
  """

  capacity: int
  window: int = 32
  chunk_length: int | None = None
  normalize_scores: bool = True
  score_agg: str = "mean"
  rope_mode: str = "original"
  max_new_tokens: int | None = None
  lean_decode: bool = True

  kernel = 1  # no pooling (kvpress's Finch scores are the window attention itself)
  pooling = "avg"

  def __post_init__(self):
    self._validate("Finch")
    if self.chunk_length is not None:
      plans.check_int("Finch", "chunk_length", self.chunk_length, 1)
    if not isinstance(self.normalize_scores, bool):
      raise ValueError(f"Finch normalize_scores={self.normalize_scores!r} must be True or False")

  @property
  def score_mode(self) -> str:
    return f"window_by_position:{self.window}" if self.normalize_scores else f"window:{self.window}"

  def max_kept(self) -> int:
    return self.capacity + (self.chunk_length is not None)

  def prefix_budget(self, num_layers: int, prompt_len: jax.Array) -> jax.Array:
    del prompt_len
    return jnp.full((num_layers,), self.capacity - self.window, jnp.int32)

  def check_chunks(self, prompt_tokens: int) -> None:
    """Refuses, as kvpress asserts, a chunked run whose `prompt_tokens`-token prompts give a chunk a share
    below the window (chunk_length <= window / (1 - r), with 1 - r = capacity / prompt_tokens)."""
    if self.chunk_length is None or prompt_tokens <= self.capacity:
      return
    if self.chunk_length * self.capacity <= self.window * prompt_tokens:
      raise ValueError(
          f"Finch chunk_length={self.chunk_length} must be > window / (1 - r) = window * prompt_tokens / "
          f"capacity = {self.window} * {prompt_tokens} / {self.capacity} = "
          f"{self.window * prompt_tokens / self.capacity:.1f} (kvpress asserts it): raise chunk_length or "
          "capacity, or shorten the prompt")

  def run_capacity(self, cfg: ModelConfig, prompt_tokens: int, new_tokens: int) -> int:
    self.check_chunks(prompt_tokens)
    return super().run_capacity(cfg, prompt_tokens, new_tokens)

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    if self.chunk_length is None:
      return super().max_held(cfg, seen)
    return np.full(cfg.num_layers, int(plans.chunk_counts(seen, self.capacity, self.chunk_length).sum()))

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    if self.chunk_length is None or capacity is None:
      return super().compact(cache, capacity)
    scores, window = self.keep_scores(cache)
    keep = plans.chunked_keep(jnp.where(window, jnp.inf, scores), cache.valid(), self.capacity, self.chunk_length)
    needed = jnp.any(plans.occupancy(cache) > self.capacity)
    out = plans.apply_plan(cache, plans.keep_mask_plan(keep, capacity), needed, capacity)
    return lean_decode_cache(out) if self.lean_decode else out
