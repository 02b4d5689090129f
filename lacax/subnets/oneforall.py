"""One-for-all fine-tuning of AmoebaLLM: every step trains a sandwich of subnets through `lacax.train`.

The parameter pytree is {"base": the model's weights (frozen), "smol": the SMoL router and experts
(trainable)}; `labels(params)` freezes the base. A batch is `lacax.train`'s (tokens, targets, mask, positions)
plus "subnets": the K sandwich shapes of the step stacked as `SubnetArrays` [K, ...] (`sandwich_batch`, a pure
function of the step, so a resumed run trains the same subnets). The loss runs the K subnets inside the one
compiled step (their shapes are array values; the step never recompiles for a new sandwich; the students run as
one `lax.scan`, so the step holds two copies of the forward, not K), takes the first (the full model with its
adapter) as the in-place teacher and sums its CE with the balanced student losses (`lacax.subnets.distill`);
the reference accumulates K backward passes into one optimizer step, which is the gradient of this sum.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lacax.model.config import ModelConfig
from lacax.subnets import distill
from lacax.subnets import smol as smol_lib
from lacax.subnets.execute import subnet_logits
from lacax.subnets.shape import SubnetSpace, stack_arrays


@dataclasses.dataclass(frozen=True)
class OneForAllConfig:
  """Distillation settings (reference defaults: pure KD, balancing on, 2 random subnets)."""

  kd_weight: float = 1.0
  balancing: bool = True
  num_random: int = 2
  reference_kd_mask: bool = False
  seed: int = 0

  def __post_init__(self):
    if not 0.0 <= self.kd_weight <= 1.0:
      raise ValueError(f"amoeba.kd_weight={self.kd_weight} must be in [0, 1]")
    if self.num_random < 0:
      raise ValueError(f"amoeba.num_random={self.num_random} must be >= 0")


def labels(params: Mapping[str, Any]) -> Any:
  """Train labels: the SMoL parameters train, the base model is frozen."""
  from lacax.train import make_labels  # pylint: disable=g-import-not-at-top

  return make_labels(params, trainable=("^smol/",))


def sandwich_batch(batch: Mapping[str, np.ndarray], step: int, space: SubnetSpace, cfg: ModelConfig,
                   ofa: OneForAllConfig) -> dict[str, Any]:
  """`batch` plus the step's sandwich ("subnets": stacked `SubnetArrays`) and its labels ("shapes")."""
  rng = np.random.default_rng([ofa.seed, step])
  shapes = distill.sandwich(rng, space, ofa.num_random)
  return {**batch, "subnets": stack_arrays([space.arrays(s, cfg) for s in shapes])}


def sandwich_loss_fn(cfg: ModelConfig, smol_cfg: smol_lib.SMoLConfig, ofa: OneForAllConfig,
                     on_trace: Callable[[], None] | None = None) -> Callable:
  """The `lacax.train` loss `(trainable, frozen, batch, rng) -> (loss, aux)` of one sandwich.

  aux: weight (target tokens), loss_k (raw loss of subnet k: CE of the teacher, KD/CE of the students).
  `on_trace` is called each time the loss is traced (compile counting in tests).
  """
  from lacax.train import combine  # pylint: disable=g-import-not-at-top

  def loss_fn(trainable, frozen, batch, rng):
    if on_trace is not None:
      on_trace()
    params = combine(trainable, frozen)
    base, smol = params["base"], params["smol"]
    subnets = batch["subnets"]
    k = subnets.layer_gate.shape[0]
    tokens, positions, targets, mask = batch["tokens"], batch["positions"], batch["targets"], batch["mask"]

    def logits_of(arrays, i):
      router_rng = None if rng is None else jax.random.fold_in(rng, i)
      return subnet_logits(base, tokens, positions, cfg, arrays, smol, smol_cfg, router_rng)

    teacher_logits = logits_of(jax.tree.map(lambda a: a[0], subnets), 0)
    teacher = distill.next_token_ce(teacher_logits, targets, mask)

    # The students run as one scan over their stacked shapes: one copy of the forward in the compiled step.
    def student(_, inputs):
      arrays, i = inputs
      li = distill.student_loss(logits_of(arrays, i), teacher_logits, targets, mask, ofa.kd_weight,
                                reference_kd_mask=ofa.reference_kd_mask)
      return None, (distill.balance(li, teacher) if ofa.balancing else li, li)

    students = jax.tree.map(lambda a: a[1:], subnets)
    _, (weighted, raw) = jax.lax.scan(student, None, (students, jnp.arange(1, k)))
    total = teacher + jnp.sum(weighted)
    aux = {"weight": jnp.sum(mask.astype(jnp.float32)), "loss_0": teacher}
    aux.update({f"loss_{i}": raw[i - 1] for i in range(1, k)})
    return total, aux

  return loss_fn
