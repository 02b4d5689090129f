"""Zero-shot scoring of classification and multiple-choice prompts: tokenized, batched, one jitted prefill.

Scoring (`Example.scoring`), always from the logits at the last prompt position of one prefill:

* "label_words" (classification, reference): argmax over the label words' tokens. Like the reference
  (`tokenizer(choices)['input_ids'][:, -1]`) a label word is represented by its *last* token.
* "generate" (multiple choice, reference): the greedy next token must decode to the answer letter. The
  reference compares the decoded token with the letter exactly, which works for SentencePiece (the decoder drops
  the leading "▁"); lacax strips whitespace so that byte-level BPE tokenizers (" A") behave the same.
* "letters": argmax restricted to the option letters (" A", " B", ...), last token of each.
* "options": cloze scoring: argmax over the first token of each option text as it continues the prompt
  (options listed in the prompt, then "Answer:" and an optional lead-in such as " The capital of France is").
  Small models are at chance on letter answers; this is how the offline multiple-choice tasks are scored.

An ACT calibration (`lacax.act.calibration`) can be applied in the prefill (`act=`, or a traced head
selection for the head search). The tasks themselves are defined in `lacax.act.tasks`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax.act.calibration import ACTConfig, make_probs_hook, make_traced_probs_hook, visibility_from_positions
from lacax.cache.kv_cache import init_cache
from lacax.model import llama
from lacax.model.config import ModelConfig

SCORINGS = ("label_words", "generate", "letters", "options")


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt to score.

  Attributes:
    prompt: the full prompt text.
    label: index of the correct candidate.
    candidates: label words ("label_words"), option letters ("generate", "letters": "A", "B", ...) or option
      continuations ("options": the text that follows the prompt, e.g. " Paris").
    scoring: one of `SCORINGS`.
    task: the task name (for per-task accuracy of pooled sets).
  """

  prompt: str
  label: int
  candidates: tuple[str, ...]
  scoring: str
  task: str

  def __post_init__(self):
    if self.scoring not in SCORINGS:
      raise ValueError(f"Example.scoring={self.scoring!r} is not supported; expected one of {SCORINGS}")
    if not 0 <= self.label < len(self.candidates):
      raise ValueError(f"Example.label={self.label} of task {self.task!r} is outside its "
                       f"{len(self.candidates)} candidates")


# --- encoding and batched scoring ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
  """One padded batch (numpy).

  Attributes:
    tokens: [B, T] int32 right-padded prompt ids.
    lengths: [B] int32 prompt lengths (1 for filler rows).
    candidates: [B, C] int32 candidate token ids, -1 = no candidate.
    index: [B] int32 position of each row's example in the encoded list, -1 for filler rows.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  candidates: np.ndarray
  index: np.ndarray


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
  """Examples tokenized and grouped into batches of similar length."""

  examples: tuple[Example, ...]
  batches: tuple[Batch, ...]
  tokenizer: Any

  @property
  def num_tokens(self) -> int:
    return int(sum(b.lengths[b.index >= 0].sum() for b in self.batches))


def candidate_token_ids(example: Example, tokenizer: Any, prompt_ids: Sequence[int]) -> list[int]:
  """The token id that stands for each candidate (see the module docstring)."""
  if example.scoring == "options":
    ids = []
    for option in example.candidates:
      full = tokenizer.encode(example.prompt + option)
      if full[:len(prompt_ids)] != list(prompt_ids) or len(full) == len(prompt_ids):
        raise ValueError(f"task {example.task!r}: option {option!r} does not continue the prompt's tokens "
                         f"(prompt ends {example.prompt[-30:]!r})")
      ids.append(full[len(prompt_ids)])
  elif example.scoring == "letters":
    ids = [tokenizer.encode(" " + c, add_bos=False)[-1] for c in example.candidates]
  else:  # label_words and generate (the latter only for the restricted prediction it also reports)
    ids = [tokenizer.encode(c if example.scoring == "label_words" else " " + c, add_bos=False)[-1]
           for c in example.candidates]
  if len(set(ids)) != len(ids):
    raise ValueError(f"task {example.task!r}: candidates {example.candidates} share a token ({ids}); the "
                     "scoring needs one distinct token per candidate")
  return ids


def encode_split(examples: Iterable[Example], tokenizer: Any, *, batch_size: int = 32, bucket: int = 16,
                 max_length: int | None = None) -> EncodedSplit:
  """Tokenizes examples and packs them into [batch_size, T] batches, T a multiple of `bucket`.

  Examples are sorted by length before batching (less padding); `Batch.index` maps rows back.

  Raises:
    ValueError: a prompt is longer than `max_length`, or candidates are ambiguous (message names the task).
  """
  examples = tuple(examples)
  if batch_size < 1 or bucket < 1:
    raise ValueError(f"batch_size={batch_size} and bucket={bucket} must be >= 1")
  ids = [tokenizer.encode(e.prompt) for e in examples]
  cands = [candidate_token_ids(e, tokenizer, i) for e, i in zip(examples, ids)]
  for e, i in zip(examples, ids):
    if max_length is not None and len(i) > max_length:
      raise ValueError(f"task {e.task!r}: a prompt has {len(i)} tokens > max_length={max_length}")
  order = sorted(range(len(examples)), key=lambda k: len(ids[k]))
  width_c = max((len(c) for c in cands), default=1)
  batches = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = -(-max(len(ids[k]) for k in rows) // bucket) * bucket
    tokens = np.zeros((batch_size, width), np.int32)
    lengths = np.ones((batch_size,), np.int32)
    candidates = np.full((batch_size, width_c), -1, np.int32)
    index = np.full((batch_size,), -1, np.int32)
    for row, k in enumerate(rows):
      tokens[row, :len(ids[k])] = ids[k]
      lengths[row] = len(ids[k])
      candidates[row, :len(cands[k])] = cands[k]
      index[row] = k
    batches.append(Batch(tokens, lengths, candidates, index))
  return EncodedSplit(examples, tuple(batches), tokenizer)


def prefill_last_logits(params: Any, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig,
                        make_hook: Callable[[jax.Array], llama.ProbsHook | None] = lambda visible: None
                        ) -> jax.Array:
  """[B, V] next-token logits at each prompt's last position, from one prefill into an empty cache.

  Args:
    params: model parameters.
    tokens: [B, T] int32 right-padded prompts; lengths: [B] int32 prompt lengths (>= 1).
    cfg: model config.
    make_hook: builds the forward's `probs_hook` from the attention visibility [B, T, T] of this prefill.
  """
  batch, width = tokens.shape
  t = jnp.arange(width, dtype=jnp.int32)[None, :]
  positions = jnp.where(t < lengths[:, None], t, -1)
  # An empty cache of `width` slots: slot s receives token s, so the slot positions equal `positions`.
  visible = visibility_from_positions(positions, positions)
  logits, _ = llama.forward(params, tokens, positions, init_cache(cfg, batch, width), cfg,
                            logits_index=lengths - 1, probs_hook=make_hook(visible))
  return logits[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "act"))
def predict_batch(params: Any, tokens: jax.Array, lengths: jax.Array, candidates: jax.Array,
                  select: jax.Array | None = None, *, cfg: ModelConfig, act: ACTConfig | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Prefills right-padded prompts and reads the next-token logits at each prompt's last position.

  ACT: `select` ([layers, heads], traced: one compile for every head set) calibrates those heads with `act`'s
  settings; without `select`, `act.heads` (static: one compile per head set) are calibrated; neither = off.

  Args:
    params: model parameters.
    tokens: [B, T] int32 prompts; lengths: [B] int32 (>= 1); candidates: [B, C] int32 ids (-1 = none).

  Returns:
    top [B] int32 argmax over the vocabulary, and choice [B] int32 argmax over the candidates.
  """
  if select is not None:
    make_hook = lambda visible: make_traced_probs_hook(select, act or ACTConfig(), cfg, visible)
  elif act is not None:
    make_hook = lambda visible: make_probs_hook(act, cfg, visible)
  else:
    make_hook = lambda visible: None
  logits = prefill_last_logits(params, tokens, lengths, cfg, make_hook)
  picked = jnp.take_along_axis(logits, jnp.maximum(candidates, 0), axis=1)
  picked = jnp.where(candidates >= 0, picked, -jnp.inf)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.argmax(picked, axis=-1).astype(jnp.int32)


def predictions(params: Any, cfg: ModelConfig, split: EncodedSplit, *, act: ACTConfig | None = None,
                select: np.ndarray | None = None) -> np.ndarray:
  """[N] int predicted candidate index per example (in `split.examples` order; -1 = no candidate).

  "generate" scoring predicts the candidate letter the greedy token decodes to (whitespace stripped); the other
  scorings take the argmax over the candidate tokens.
  """
  out = np.full((len(split.examples),), -1, np.int64)
  select = None if select is None else jnp.asarray(select, jnp.float32)
  decoded: dict[int, str] = {}
  for batch in split.batches:
    top, choice = jax.device_get(predict_batch(params, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
                                               jnp.asarray(batch.candidates), select, cfg=cfg, act=act))
    for row, k in enumerate(batch.index):
      if k < 0:
        continue
      example = split.examples[k]
      if example.scoring == "generate":
        token = int(top[row])
        if token not in decoded:
          decoded[token] = split.tokenizer.decode([token], skip_special_tokens=True).strip()
        out[k] = example.candidates.index(decoded[token]) if decoded[token] in example.candidates else -1
      else:
        out[k] = int(choice[row])
  return out


def correct(params: Any, cfg: ModelConfig, split: EncodedSplit, *, act: ACTConfig | None = None,
            select: np.ndarray | None = None) -> np.ndarray:
  """[N] bool: the prediction of each example is its label."""
  labels = np.array([e.label for e in split.examples], np.int64)
  return predictions(params, cfg, split, act=act, select=select) == labels
