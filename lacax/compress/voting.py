"""Edge-LLM voting: the exits of adaptive layer tuning combine their distributions (arXiv 2406.15758; reference
GATECH-EIC/Edge-LLM `main.py`, `MMLUEvalCallback`).

The reference's vote: stack the per-exit softmax vectors, take for every vocabulary entry the maximum over
exits, renormalise over the vocabulary (`vote`). For a multiple-choice question the answer is the argmax of the
combined distribution over the class token ids (A/B/C/D): the class that some exit gives the highest
probability, a max-confidence vote. Every figure is reported beside each single exit's (`mc_report`,
`perplexity_report`), so that a vote can be compared with the best single exit.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def vote(exit_logits: jax.Array) -> jax.Array:
  """[..., V] combined distribution of exit logits [E, ..., V]: softmax per exit, max over exits, renormalise."""
  probs = jax.nn.softmax(exit_logits.astype(jnp.float32), axis=-1)
  top = jnp.max(probs, axis=0)
  return top / jnp.sum(top, axis=-1, keepdims=True)


def choices(exit_logits: jax.Array, class_ids: Sequence[int] | jax.Array) -> tuple[jax.Array, jax.Array]:
  """(answers [E, B] of every single exit, voted answers [B]) over `class_ids` (index into class_ids).

  Args:
    exit_logits: [E, B, V] logits at the answer position.
    class_ids: [C] token ids of the classes (A/B/C/D), or [B, C] per question with -1 = no candidate.
  """
  ids = jnp.asarray(class_ids, jnp.int32)
  ids = jnp.broadcast_to(ids, exit_logits.shape[1:2] + ids.shape[-1:])

  def pick(scores):  # [..., B, V] -> [..., B] index of the best candidate
    picked = jnp.take_along_axis(scores, jnp.broadcast_to(jnp.maximum(ids, 0), scores.shape[:-1] + ids.shape[-1:]),
                                 axis=-1)
    return jnp.argmax(jnp.where(ids >= 0, picked, -jnp.inf), axis=-1)

  return pick(exit_logits.astype(jnp.float32)), pick(vote(exit_logits))


def mc_report(exit_logits: jax.Array, class_ids: Sequence[int], labels: Sequence[int]) -> dict[str, object]:
  """Accuracy of every exit, of the vote and of the best single exit on multiple-choice questions.

  Args:
    exit_logits: [E, B, V] logits at each question's answer position.
    class_ids: [C] the class token ids ([B, C] per question, -1 = none).
    labels: [B] index of the right class of each question.
  """
  single, voted = jax.device_get(choices(exit_logits, class_ids))
  labels = np.asarray(labels)
  per_exit = [float(np.mean(s == labels)) for s in single]
  return {"per_exit_accuracy": per_exit, "vote_accuracy": float(np.mean(voted == labels)),
          "best_exit_accuracy": max(per_exit), "best_exit": int(np.argmax(per_exit)), "n": int(labels.size)}


def token_nll(probs: jax.Array, targets: jax.Array) -> jax.Array:
  """[B, T] NLL of targets [B, T] under a distribution [B, T, V] (e.g. `vote`'s)."""
  picked = jnp.take_along_axis(probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.log(jnp.maximum(picked, jnp.finfo(jnp.float32).tiny))


def nll_sums(exit_logits: jax.Array, final_logits: jax.Array, targets: jax.Array, mask: jax.Array
             ) -> dict[str, jax.Array]:
  """Summed NLL over the masked targets: per exit [E], of the vote, and of the model's head on the last adapted
  state (`final`); plus the token count. Sum over batches, then `perplexities`."""
  from lacax.train.losses import token_nll as logits_nll  # pylint: disable=g-import-not-at-top

  mask = mask.astype(jnp.float32)
  per_exit = jax.vmap(lambda lg: jnp.sum(logits_nll(lg, targets) * mask))(exit_logits)
  return {"per_exit": per_exit, "vote": jnp.sum(token_nll(vote(exit_logits), targets) * mask),
          "final": jnp.sum(logits_nll(final_logits, targets) * mask), "tokens": jnp.sum(mask)}


def perplexities(sums: dict[str, object]) -> dict[str, object]:
  """Perplexities from summed NLLs (`nll_sums`, possibly added over batches)."""
  n = max(float(sums["tokens"]), 1.0)
  per_exit = [float(np.exp(float(s) / n)) for s in np.asarray(sums["per_exit"])]
  return {"per_exit_ppl": per_exit, "vote_ppl": float(np.exp(float(sums["vote"]) / n)),
          "final_ppl": float(np.exp(float(sums["final"]) / n)), "best_exit_ppl": min(per_exit),
          "tokens": int(n)}
