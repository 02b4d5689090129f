"""KVzip (arXiv 2505.23416): query-agnostic scores by context reconstruction.

Reference NVIDIA/kvpress `presses/kvzip_press.py::KVzipPress` (prefill only, batch 1). After the prompt (the
context, n tokens) is prefilled, the model runs once more over the cache on the reconstruction input
[repeat prompt ("\\n\\nRepeat the previous context exactly." + the chat template's assistant suffix, "\\n"
without a template), the context again] (chunk by chunk for contexts over `chunk_size`, see below), at positions
n, n + 1, ...; in every layer (`score_kvzip`), the score
of a context key is the largest attention it receives from any reconstruction query of any query head of its
group (the softmax over the context and the causal reconstruction keys). The reconstruction's own keys are then
dropped. `compress_post`: the first `n_sink` tokens get the top score (max + 1); with `layerwise=False` (the
default) the int(L * KV * n * ratio) lowest scores over *all* layers, kv heads and tokens are evicted (so layers
and heads keep different numbers of tokens); with `layerwise=True` each layer evicts its own
int(KV * n * ratio) across its heads.

Where it lives in lacax. The score needs the model (an extra forward pass), which a policy's `compact` never
has. `CachePolicy.after_prefill(params, cfg, cache, tokens, lengths)` is the hook every prefill path calls with
the model between the prompt forward and the hand-off (`lacax.generate.prefill`, the shared prefill of
`oneshot_generate`, the kvpress parity driver); every other policy returns the cache unchanged, the wrappers
pass it to their inner policy. KVzip's hook runs the reconstruction with lacax's one forward
(`llama.run` into a copy of the cache with room for it, `ForwardOptions(hidden_layers=...)` for the residual
stream entering every layer), recomputes each layer's reconstruction queries from it and their attention over
that cache (`llama.attention_probs`, the forward's own probabilities), and leaves the max in `cache.scores`; the
hand-off (`compact(cache, capacity)`) selects from them and returns a lean decode cache. So the scoring is an
ordinary jitted function of (params, cache, tokens) with static shapes (a pass's input has the prompt's ids plus
one chunk), and the forward itself needs no new recording mode.
ExpectedAttention and Q-Filters get their inputs offline (calibration files) or from the forward's recordings;
KVzip cannot, since its queries do not exist until the reconstruction runs.

Where lacax differs:
* the repeat prompts are token ids the caller gives (`repeat_ids`, `continue_ids`, `suffix_ids`, e.g.
  `repeat_prompt_ids(tokenizer.encode)`): policies hold no tokenizer. () reconstructs from the context alone;
* prompts longer than `chunk_size` (2048, kvpress's default) are reconstructed chunk by chunk as kvpress does:
  one pass per chunk over the prefilled cache, the later ones after the "starting with" instruction and the
  previous chunk's last 8 tokens, each pass's softmax over the first min(n_sink, chunk start) tokens, its chunk
  and its own tokens. The passes are a static Python loop over the chunks of the padded width (a row's pass
  over a chunk it does not reach feeds nothing);
* no chat-template prefix: kvpress scores only the context after the template's prefix tokens (their score
  stays 0 besides the sinks); lacax scores every prompt token (the same when there is no template);
* KVzip+ normalisation (`kvzip_plus_normalization`) is not implemented;
* every row of a batch is selected on its own (kvpress runs batch 1); ties go to the older token, then the
  lower layer and head (`torch.topk` leaves them unspecified);
* kvpress masks evicted keys with fake keys (`attention_patch.py`) and keeps them; lacax drops them.

Memory. kvpress saves none. lacax's cache is rectangular: after the hand-off every layer has as many slots as
its fullest kv head, and KVzip may leave one head (or layer) with the whole prompt, so the decode cache is sized
for the whole prompt plus the generated tokens (`run_capacity`) and the evicted slots stay empty. The
reconstruction pass costs a second prefill of about the prompt's length (kvpress: "2-3 times" the prefill).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy, RopeState, lean_decode_cache, ranked_scores, resize
from lacax.cache.kv_cache import KVCache
from lacax.model import rope as rope_lib
from lacax.model.config import ModelConfig

_OWNER = "KVzip"
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."  # kvpress `KVzipPress.prepare`, first chunk
CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"  # the later chunks
POSTFIX = 8  # kvpress `prepare(prev_postfix_size=8)`: the previous chunk's last tokens after CONTINUE_PROMPT


def repeat_prompt_ids(encode: Callable[[str], list[int]], suffix: str = "\n") -> dict[str, tuple[int, ...]]:
  """The reconstruction prompts' ids as KVzipPolicy fields: kvpress's two repeat instructions and `suffix` (the
  chat template's text after the user turn; "\\n" for a model without a template, as kvpress), each encoded
  without special tokens: `KVzipPolicy(budget, **repeat_prompt_ids(tokenizer.encode))`."""
  ids = lambda text: tuple(int(t) for t in encode(text))  # noqa: E731
  return {"repeat_ids": ids(REPEAT_PROMPT), "continue_ids": ids(CONTINUE_PROMPT), "suffix_ids": ids(suffix)}


def reconstruction_inputs(tokens: jax.Array, lengths: jax.Array, start: int, chunk: int, prompt_ids, suffix_ids,
                          postfix: int):
  """(tokens [B, W], positions [B, W]) of the reconstruction pass of the chunk [start, start + chunk) (kvpress
  `prepare`): row b is prompt_ids, the `postfix` prompt tokens before `start`, suffix_ids, then the chunk's
  m_b = clip(n_b - start, 0, chunk) tokens, at positions n_b, n_b + 1, ...; padding (and a row whose chunk is
  empty) at -1. tokens [B, T] right-padded prompts of `lengths` [B]; W = len(prompt) + postfix + len(suffix) +
  chunk."""
  head = len(prompt_ids) + postfix + len(suffix_ids)
  const = np.asarray(list(prompt_ids) + [0] * postfix + list(suffix_ids) + [0] * chunk, np.int32)
  source = np.full(head + chunk, -1, np.int32)  # the prompt token each input copies, -1 = a constant id
  source[len(prompt_ids):len(prompt_ids) + postfix] = np.arange(start - postfix, start)
  source[head:] = np.arange(start, start + chunk)
  T = tokens.shape[1]
  copied = jnp.take(tokens, jnp.asarray(np.clip(source, 0, T - 1)), axis=1)  # [B, W]
  ids = jnp.where(jnp.asarray(source >= 0)[None], copied, jnp.asarray(const)[None])
  m = jnp.clip(lengths - start, 0, chunk)[:, None]
  j = jnp.arange(head + chunk, dtype=jnp.int32)[None]
  valid = (j < head + m) & (m > 0)
  return jnp.where(valid, ids, 0).astype(jnp.int32), jnp.where(valid, lengths[:, None] + j, -1).astype(jnp.int32)


def reconstruction_scores(params, cfg: ModelConfig, cache: KVCache, tokens: jax.Array, lengths: jax.Array, *,
                          repeat_ids=(), continue_ids=(), suffix_ids=(), chunk_size: int | None = None,
                          n_sink: int = 4) -> jax.Array:
  """[L, B, S, KV] float32: for every slot of the prefilled `cache`, the largest attention its key receives from
  a reconstruction query of its group (kvpress `score_kvzip`); 0 at empty slots.

  The prompt is reconstructed chunk by chunk (`chunk_size` tokens; None = one chunk), each pass over a copy of
  the prefilled cache with room for it; a pass's softmax spans the first min(n_sink, start) tokens, its chunk
  and its own tokens (kvpress `_compute_cross_attention`), while the forward itself attends the whole cache.
  """
  from lacax.model import llama  # pylint: disable=g-import-not-at-top  (llama imports the cache package)

  if isinstance(params["layers"], (list, tuple)):
    raise ValueError("KVzip's reconstruction needs a homogeneous model (params['layers'] is a list of segments)")
  S, T = cache.capacity, tokens.shape[1]
  chunk = T if chunk_size is None else min(chunk_size, T)
  layers = params["layers"]
  inv_freq = rope_lib.inv_frequencies(cfg)
  kv, g = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
  bq = layers["bq"] if cfg.attention_bias else jnp.zeros(layers["wq"].shape[:1] + layers["wq"].shape[-2:])
  plain = cache.replace(scores=None, score_mode=None, stats=None)
  n = lengths[None, :, None, None]  # against pos [L, B, S', KV]
  scores = jnp.zeros(cache.pos.shape, jnp.float32)
  for start in range(0, T, chunk):  # static: one pass per chunk of the padded width
    postfix = min(POSTFIX, chunk) if start else 0
    rec_tokens, rec_pos = reconstruction_inputs(tokens, lengths, start, chunk, continue_ids if start else repeat_ids,
                                                suffix_ids, postfix)
    options = llama.ForwardOptions(hidden_layers=tuple(range(cfg.num_layers)), logits=False)
    out = llama.run(params, rec_tokens, rec_pos, resize(plain, S + rec_tokens.shape[1]), cfg, options=options)
    full = out.cache  # the context and this pass's tokens
    keys = plans.scoring_keys(full, "post_rope", jnp.asarray(inv_freq, jnp.float32))
    pos = full.pos
    end = jnp.minimum(start + chunk, n)
    in_chunk = (pos >= start) & (pos < end)
    seen = (pos >= 0) & ((pos < min(n_sink, start)) | in_chunk | (pos >= n))
    scored_pos = jnp.where(seen, pos, -1)

    def layer(h, norm, wq, b, k, kpos, rec_pos=rec_pos):
      q = llama.project(llama.rms_norm(h, norm, cfg.rms_norm_eps), wq, "btd,dhk->bthk").astype(jnp.float32) + b
      q = rope_lib.apply_rope(q, rec_pos[:, :, None], inv_freq)
      B, W = q.shape[:2]
      probs = llama.attention_probs(q.reshape(B, W, kv, g, -1), k, kpos, rec_pos)  # [B, KV, G, W, S']
      probs = jnp.where((rec_pos >= 0)[:, None, None, :, None], probs, 0.0)
      return jnp.transpose(jnp.max(probs, axis=(2, 3)), (0, 2, 1))[:, :S]  # [B, S, KV]

    chunk_scores = jax.vmap(layer)(out.hidden, layers["attn_norm"], layers["wq"], bq, keys, scored_pos)
    scores = jnp.where(in_chunk[:, :, :S], chunk_scores, scores)
  return jnp.where(cache.valid(), scores, 0.0)


@dataclasses.dataclass(frozen=True)
class KVzipPolicy(CachePolicy):
  """KVzip: keep the `budget` tokens per (layer, kv head) on average whose keys the model's reconstruction of
  the context attends most; the first `n_sink` always.

  Attributes:
    budget: mean tokens kept per (layer, kv head) (kvpress: k_len * (1 - compression_ratio)); the row keeps
      L * KV * budget tokens in all (`layerwise=False`) or KV * budget per layer (`layerwise=True`).
    repeat_ids, continue_ids, suffix_ids: the token ids of kvpress's first and later repeat instructions and of
      the chat template's suffix (`repeat_prompt_ids(tokenizer.encode)`); () = none.
    chunk_size: prompt tokens reconstructed per pass (2048, kvpress); None = the whole prompt in one pass.
    layerwise: one budget per layer instead of one over all layers (False, kvpress's default).
    n_sink: leading tokens always kept (4, kvpress).
    rope_mode: "original" (default, kvpress's positions) or "stored".
  """

  budget: int
  repeat_ids: tuple = ()
  continue_ids: tuple = ()
  suffix_ids: tuple = ()
  chunk_size: int | None = 2048
  layerwise: bool = False
  n_sink: int = 4
  rope_mode: str = "original"

  def __post_init__(self):
    plans.check_int(_OWNER, "budget", self.budget, 1)
    plans.check_int(_OWNER, "n_sink", self.n_sink, 0)
    if not isinstance(self.layerwise, bool):
      raise ValueError(f"{_OWNER} layerwise={self.layerwise!r} must be True or False")
    if self.rope_mode not in ("original", "stored"):
      raise ValueError(f"{_OWNER} rope_mode={self.rope_mode!r} must be 'original' or 'stored' (the scores are "
                       "attention at the original positions)")
    if self.chunk_size is not None:
      plans.check_int(_OWNER, "chunk_size", self.chunk_size, 1)
    for name in ("repeat_ids", "continue_ids", "suffix_ids"):
      ids = getattr(self, name)
      if not isinstance(ids, (tuple, list)) or not all(
          isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{_OWNER} {name}={ids!r} must be a tuple of token ids (ints >= 0)")
      object.__setattr__(self, name, tuple(int(t) for t in ids))

  def init_state(self, cfg: ModelConfig) -> RopeState:
    return RopeState(inv_freq=jnp.asarray(rope_lib.inv_frequencies(cfg), jnp.float32))

  @property
  def sink_tokens(self) -> int:
    return self.n_sink

  @property
  def compacts_in_decode(self) -> bool:
    return False

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    del cfg
    return max_tokens  # one head may keep the whole prompt

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    return np.full(cfg.num_layers, seen)

  def after_prefill(self, params, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
                    lengths: jax.Array) -> KVCache:
    """The prefilled cache with the reconstruction scores in `cache.scores` (see the module docstring)."""
    scores = reconstruction_scores(params, cfg, cache, tokens, lengths, repeat_ids=self.repeat_ids,
                                   continue_ids=self.continue_ids, suffix_ids=self.suffix_ids,
                                   chunk_size=self.chunk_size, n_sink=self.n_sink)
    return cache.replace(scores=scores)

  def keep_mask(self, cache: KVCache) -> jax.Array:
    """[L, B, S, KV] bool: the sinks, then the best-scored tokens up to the row's (or layer's) budget."""
    if cache.scores is None:
      raise ValueError("KVzip.compact needs the reconstruction scores: run policy.after_prefill(params, cfg, "
                       "cache, tokens, lengths) on the prefilled cache first (lacax.generate.prefill does)")
    valid = cache.valid()
    L, B, S, KV = valid.shape
    sinks = valid & (cache.pos >= 0) & (cache.pos < self.n_sink)
    ranked = ranked_scores(cache.scores, sinks)
    if self.layerwise:  # per (layer, row): one ranking over the layer's (slot, head) pairs, slot-major
      rank = plans.descending_rank(ranked.reshape(L, B, S * KV, 1), valid.reshape(L, B, S * KV, 1))
      return valid & (rank.reshape(L, B, S, KV) < KV * self.budget)
    # per row: one ranking over every (slot, layer, head), slot-major (ties: older token, lower layer, head)
    flat = jnp.transpose(ranked, (1, 2, 0, 3)).reshape(1, B, S * L * KV, 1)
    ok = jnp.transpose(valid, (1, 2, 0, 3)).reshape(1, B, S * L * KV, 1)
    rank = plans.descending_rank(flat, ok).reshape(B, S, L, KV)
    return valid & (jnp.transpose(rank, (2, 0, 1, 3)) < L * KV * self.budget)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    """Evicts the lowest-scored tokens in the prefill hand-off (the call given `capacity`); decode calls keep
    all. The decode cache records nothing."""
    if capacity is None:
      return cache
    plan = lambda c: plans.keep_mask_plan(self.keep_mask(c), capacity)  # noqa: E731
    needed = jnp.any(plans.occupancy(cache) > self.budget)
    out = plans.apply_plan(cache, plan, needed, capacity)
    return lean_decode_cache(out)  # the scores are read once, here
