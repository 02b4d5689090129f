"""Optimizers and learning-rate schedules from a config: optax AdamW / SGD, constant or warmup-cosine, clipping.

`OptimizerConfig` is a frozen dataclass (validated when built, messages naming `optimizer.<field>`);
`make_optimizer(config, total_steps)` returns the optax `GradientTransformation` and the schedule (for logging the
learning rate). `optimizer_config_from(c)` reads a config section (an `ml_collections.ConfigDict` or a mapping).

Weight decay follows the PyTorch / Hugging Face convention: decoupled (AdamW), applied to matrices only (arrays of
rank >= 2), never to norms and biases; `decay_all=True` decays every array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import optax

_OPTIMIZERS = ("adamw", "sgd")
_SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """What `make_optimizer` builds.

  Attributes:
    name: "adamw" or "sgd" (momentum `b1`, 0 = plain SGD).
    learning_rate: the peak learning rate.
    schedule: "constant" (after `warmup_steps` of linear warm-up, if any), "warmup_cosine" (linear warm-up to
      the peak, cosine decay to `end_lr_ratio` x peak at the last step) or "warmup_linear".
    warmup_steps: steps of linear warm-up from 0.
    end_lr_ratio: final learning rate / peak, for the decaying schedules.
    b1, b2, eps: Adam moments (b1 is SGD's momentum).
    weight_decay: decoupled weight decay (AdamW), on matrices only unless `decay_all`.
    decay_all: decay every parameter (norms and biases too).
    clip_norm: clip the global gradient norm to this value (0 = no clipping).
  """

  name: str = "adamw"
  learning_rate: float = 1e-3
  schedule: str = "warmup_cosine"
  warmup_steps: int = 0
  end_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  decay_all: bool = False
  clip_norm: float = 1.0

  def __post_init__(self):
    if self.name not in _OPTIMIZERS:
      raise ValueError(f"optimizer.name={self.name!r} is unknown; expected one of {_OPTIMIZERS}")
    if self.schedule not in _SCHEDULES:
      raise ValueError(f"optimizer.schedule={self.schedule!r} is unknown; expected one of {_SCHEDULES}")
    if not self.learning_rate > 0:
      raise ValueError(f"optimizer.learning_rate={self.learning_rate} must be > 0")
    if self.warmup_steps < 0:
      raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      raise ValueError(f"optimizer.end_lr_ratio={self.end_lr_ratio} must lie in [0, 1]")
    for field in ("b1", "b2"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ValueError(f"optimizer.{field}={getattr(self, field)} must lie in [0, 1)")
    if self.weight_decay < 0:
      raise ValueError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
    if self.clip_norm < 0:
      raise ValueError(f"optimizer.clip_norm={self.clip_norm} must be >= 0 (0 = no clipping)")


def optimizer_config_from(section: Mapping[str, Any] | Any | None) -> OptimizerConfig:
  """An `OptimizerConfig` from a config section; unknown fields are refused by name."""
  if section is None:
    return OptimizerConfig()
  if isinstance(section, OptimizerConfig):
    return section
  values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  known = {f.name for f in dataclasses.fields(OptimizerConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"optimizer config has unknown fields {unknown}; expected some of {sorted(known)}")
  return OptimizerConfig(**values)


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """The learning rate at each (optimizer) step."""
  peak, warmup = config.learning_rate, config.warmup_steps
  if total_steps < 1:
    raise ValueError(f"train.steps={total_steps} must be >= 1")
  if config.schedule != "constant" and warmup >= total_steps:
    raise ValueError(f"optimizer.warmup_steps={warmup} must be < train.steps={total_steps} for schedule "
                     f"{config.schedule!r}")
  if config.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup])
  if config.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, end_value=peak * config.end_lr_ratio)
  decay = optax.linear_schedule(peak, peak * config.end_lr_ratio, total_steps - warmup)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                         Callable[[Any], Any]]:
  """(optax transformation, learning-rate schedule) for `config` over `total_steps` optimizer steps."""
  schedule = make_schedule(config, total_steps)
  parts = []
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  if config.name == "adamw":
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                             mask=None if config.decay_all else _decay_mask))
  else:
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, None if config.decay_all else _decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.b1 or None))
  return optax.chain(*parts), schedule
