"""In-place distillation with loss-magnitude balancing, and sandwich sampling (AmoebaLLM, arXiv 2411.10606).

Reference: GATECH-EIC/AmoebaLLM `transformers/src/transformers/trainer.py` (`training_step`,
`sandwich_sampling`, `compute_loss`, `KLLossSoft`):

  * every batch trains K = 2 + `random_sample_num_layer` (= 4) subnets: T1 = (all layers, width 1), two with a
    depth drawn uniformly from [min_depth, L - 1] (numpy's exclusive upper bound: full depth is never drawn at
    random) and widths drawn without replacement from the grid, and T4 = (min_depth, smallest width);
  * T1's loss is next-token cross-entropy; its logits, detached, are the teacher ("in-place": the current
    adapter, not a frozen model); a student's loss is kd_weight * KD + (1 - kd_weight) * CE, KD being the soft
    cross-entropy -sum_v p_T(v) log p_S(v) at temperature 1 (gradient of KL(p_T || p_S));
  * balancing (on by default): a student's loss becomes L_i * sg(L_1) / sg(L_i): its value equals the teacher's
    loss and its gradient is (L_1 / L_i) grad L_i, so no subnet dominates the shared adapter update.

Batches follow `lacax.train`'s convention: logits[:, t] predict targets[:, t], which count where mask[:, t].
lacax averages KD over the same positions as the CE; the reference averages it over the unshifted label mask
(position t counts when token t is a label), an off-by-one (`reference_kd_mask=True` restores it).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax.subnets.shape import SubnetShape, SubnetSpace
from lacax.train.losses import next_token_loss


def next_token_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean NLL of targets[:, t] under logits[:, t] over the positions where mask[:, t] (lacax.train's loss)."""
  return next_token_loss(logits, targets, mask)[0]


def soft_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
                       reference_kd_mask: bool = False) -> jax.Array:
  """-sum_v p_T(v) log p_S(v), averaged over the masked positions; no gradient flows to the teacher.

  Args:
    student_logits, teacher_logits: [B, T, V].
    mask: [B, T] 1 where position t's prediction counts (its target is a label). With `reference_kd_mask`,
      position t counts where mask[:, t - 1] (the reference's unshifted label mask).
  """
  p_t = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  per_pos = -jnp.sum(p_t * log_p_s, axis=-1)  # [B, T]
  w = mask.astype(jnp.float32)
  if reference_kd_mask:
    w = jnp.pad(w[:, :-1], ((0, 0), (1, 0)))
  return jnp.sum(per_pos * w) / jnp.maximum(jnp.sum(w), 1.0)


def balance(student_loss: jax.Array, teacher_loss: jax.Array) -> jax.Array:
  """L_i * sg(L_1) / sg(L_i): the value of the teacher's loss, the gradient (L_1 / L_i) * grad L_i."""
  return student_loss * jax.lax.stop_gradient(teacher_loss) / jax.lax.stop_gradient(student_loss)


def sandwich(rng: np.random.Generator, space: SubnetSpace, num_random: int = 2) -> list[SubnetShape]:
  """The subnets of one training step: [largest, num_random random ones, smallest].

  Random depths are uniform over [min_depth, L - 1]; random widths are distinct draws from the grid (without
  replacement, as the reference), so `num_random` may not exceed the grid's size.
  """
  if num_random > len(space.widths):
    raise ValueError(f"num_random={num_random} exceeds the width grid's {len(space.widths)} values "
                     f"{list(space.widths)} (widths are drawn without replacement)")
  L = space.num_layers
  # depth in [min_depth, L - 1]; with min_depth == L (no depth shrinking) the full depth is the only choice.
  depths = rng.integers(space.min_depth, max(L, space.min_depth + 1), size=num_random)
  widths = rng.choice(len(space.widths), size=num_random, replace=False)
  shapes = [space.largest]
  shapes += [space.shape(int(d), space.widths[int(w)]) for d, w in zip(depths, widths)]
  shapes.append(space.smallest)
  return shapes


def student_loss(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array, mask: jax.Array,
                 kd_weight: float = 1.0, *, reference_kd_mask: bool = False) -> jax.Array:
  """kd_weight * KD + (1 - kd_weight) * CE of one student."""
  loss = 0.0
  if kd_weight:
    loss = kd_weight * soft_cross_entropy(student_logits, teacher_logits, mask, reference_kd_mask=reference_kd_mask)
  if kd_weight != 1.0:
    loss = loss + (1.0 - kd_weight) * next_token_ce(student_logits, targets, mask)
  return loss


def sandwich_loss(logits: Sequence[jax.Array], targets: jax.Array, mask: jax.Array, *, kd_weight: float = 1.0,
                  balancing: bool = True, reference_kd_mask: bool = False) -> tuple[jax.Array, jax.Array]:
  """Total loss of one sandwich (logits[0] = the largest subnet, the teacher) and the per-subnet raw losses."""
  teacher = next_token_ce(logits[0], targets, mask)
  raw = [teacher]
  total = teacher
  for lg in logits[1:]:
    li = student_loss(lg, logits[0], targets, mask, kd_weight, reference_kd_mask=reference_kd_mask)
    raw.append(li)
    total = total + (balance(li, teacher) if balancing else li)
  return total, jnp.stack(raw)
