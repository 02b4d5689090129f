"""CTC loss, greedy CTC decoding and edit-distance metrics (CER / WER, equal to jiwer's corpus-level scores)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def ctc_loss(logits: jax.Array, frame_mask: jax.Array, labels: jax.Array, label_mask: jax.Array,
             blank_id: int = 0) -> jax.Array:
  """Per-utterance CTC negative log-likelihood (`optax.ctc_loss`), not length-normalised.

  Args:
    logits: [batch, frames, vocab] unnormalised.
    frame_mask: [batch, frames], 1 for valid frames.
    labels: [batch, max_labels] int, right-padded.
    label_mask: [batch, max_labels], 1 for valid labels.
  Returns:
    [batch] float32.
  """
  return optax.ctc_loss(logits.astype(jnp.float32), 1.0 - frame_mask.astype(jnp.float32), labels,
                        1.0 - label_mask.astype(jnp.float32), blank_id=blank_id)


def ctc_min_frames(label_ids) -> int:
  """Frames CTC needs for a label sequence: its length plus one blank between each repeated pair."""
  ids = list(label_ids)
  return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


def greedy_decode(logits: jax.Array, frame_mask: jax.Array, blank_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Best-path CTC decoding, jit-friendly: argmax, collapse repeats, drop blanks, left-pack.

  Returns:
    ids: [batch, frames] int32, the decoded labels left-packed, padded with -1.
    lengths: [batch] int32.
  """
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  valid = frame_mask.astype(bool)
  prev = jnp.pad(best, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  keep = valid & (best != blank_id) & (best != prev)
  pos = jnp.cumsum(keep, axis=1) - 1
  t = best.shape[1]
  target = jnp.where(keep, pos, t)  # dropped frames scatter out of range
  out = jnp.full((best.shape[0], t + 1), -1, jnp.int32)
  out = jax.vmap(lambda o, tg, b: o.at[tg].set(b))(out, target, best)[:, :t]
  return out, keep.sum(axis=1).astype(jnp.int32)


def unpack(ids, lengths) -> list[list[int]]:
  ids, lengths = np.asarray(ids), np.asarray(lengths)
  return [ids[i, :lengths[i]].tolist() for i in range(ids.shape[0])]


def edit_distance(ref, hyp) -> int:
  """Levenshtein distance between two sequences (substitution, insertion, deletion cost 1)."""
  ref, hyp = list(ref), list(hyp)
  prev = list(range(len(hyp) + 1))
  for i, r in enumerate(ref, 1):
    cur = [i] + [0] * len(hyp)
    for j, h in enumerate(hyp, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
    prev = cur
  return prev[-1]


def cer(references, hypotheses) -> float:
  """Corpus character error rate: total character edits / total reference characters (jiwer.cer)."""
  if isinstance(references, str):
    references, hypotheses = [references], [hypotheses]
  if len(references) != len(hypotheses):
    raise ValueError(f"cer: {len(references)} references but {len(hypotheses)} hypotheses")
  total = sum(len(r) for r in references)
  if total == 0:
    raise ValueError("cer: references have no characters")
  return sum(edit_distance(r, h) for r, h in zip(references, hypotheses)) / total


def wer(references, hypotheses) -> float:
  """Corpus word error rate: total word edits / total reference words (jiwer.wer)."""
  if isinstance(references, str):
    references, hypotheses = [references], [hypotheses]
  if len(references) != len(hypotheses):
    raise ValueError(f"wer: {len(references)} references but {len(hypotheses)} hypotheses")
  refs = [r.split() for r in references]
  total = sum(len(r) for r in refs)
  if total == 0:
    raise ValueError("wer: references have no words")
  return sum(edit_distance(r, h.split()) for r, h in zip(refs, hypotheses)) / total
