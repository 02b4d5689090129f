"""Master-ASR training (Yu et al., ICML 2023, arXiv 2306.15686, Sec. 3.5-3.6) and its baselines.

Every method is a loss over the one forward (`model.logits`) plus an optax transformation, in the contract of
lacax's training loop: `loss_fn(trainable, frozen, batch, rng) -> (loss, aux)`.

Stage 1 (multilingual; `stage1_optimizer("master_asr", ...)`), all rules inside `optax.multi_transform`:
  * selection rows T: Adam at alpha x the base learning rate (alpha = 10), updated only on steps with
    step % beta == 0 (beta = 5), constant learning rate (the tri-stage schedule is for everything else);
  * specialist scores M and the weights W alternate every gamma steps (W in even phases, M in odd phases;
    gamma = 0 trains both every step);
  * the CTC head and the rest follow a tri-stage schedule (warm-up, hold, exponential decay; wav2vec 2.0
    fine-tuning, Baevski et al. 2020).
Stage 2 (a new language; `new_language`): one new row per selection table and a new CTC head are the only
trainable leaves; the stage-1 model is a frozen leaf, so old languages' logits stay bit-identical.

Baselines (same encoder, same data, same loop): "dense" multilingual fine-tuning; "adapters" (per-language
Houlsby-style bottlenecks after every FFN, backbone frozen; Le et al. 2021 / GATECH-EIC/S3-Router
`wav2vec2_adapter.py`); "s3router" (per-language score tensors, one mask per language, weights frozen; Fu et al.
NeurIPS 2022); "full_ft" (stage 2 only: every weight of the dense model plus a new head).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lacax import train as train_lib
from lacax.asr import artisan
from lacax.asr import ctc
from lacax.asr import frontend
from lacax.asr import model

STAGE1_METHODS = ("dense", "master_asr", "adapters", "s3router")
STAGE2_METHODS = ("master_asr", "master_asr_head_only", "adapters", "s3router", "full_ft")


# ------------------------------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Learning rates and the Master-ASR update rules.

  Attributes:
    lr: peak learning rate of everything but the selection rows.
    steps: optimizer steps (for the tri-stage schedule).
    warmup, hold: fractions of `steps` in warm-up and at the peak; the rest decays exponentially.
    init_scale, final_scale: the schedule's start and end as fractions of `lr`.
    select_lr_mult: alpha, the selection rows' learning-rate multiplier.
    select_every: beta, selection rows update on steps with step % beta == 0.
    phase_every: gamma, W and M alternate every gamma steps (0: both update every step).
    clip: global gradient-norm clip (0: none).
  """
  lr: float = 1e-3
  steps: int = 1000
  warmup: float = 0.1
  hold: float = 0.4
  init_scale: float = 0.01
  final_scale: float = 0.05
  select_lr_mult: float = 10.0
  select_every: int = 5
  phase_every: int = 100
  clip: float = 1.0

  def __post_init__(self):
    if self.lr <= 0 or self.steps < 1:
      raise ValueError(f"ScheduleConfig: lr={self.lr} must be > 0 and steps={self.steps} >= 1")
    if not (0 <= self.warmup and 0 <= self.hold and self.warmup + self.hold <= 1):
      raise ValueError(f"ScheduleConfig: warmup={self.warmup}, hold={self.hold} must be >= 0 with sum <= 1")
    if self.select_every < 1 or self.phase_every < 0:
      raise ValueError(f"ScheduleConfig: select_every={self.select_every} must be >= 1 and "
                       f"phase_every={self.phase_every} >= 0")


def tri_stage(cfg: ScheduleConfig) -> optax.Schedule:
  """Linear warm-up from init_scale * lr, hold at lr, exponential decay to final_scale * lr."""
  w = int(round(cfg.warmup * cfg.steps))
  h = int(round(cfg.hold * cfg.steps))
  d = max(cfg.steps - w - h, 1)
  warm = optax.linear_schedule(cfg.init_scale * cfg.lr, cfg.lr, max(w, 1))
  hold = optax.constant_schedule(cfg.lr)
  decay = optax.exponential_decay(cfg.lr, d, cfg.final_scale)
  return optax.join_schedules([warm, hold, decay], [w, w + h])


class GatedState(NamedTuple):
  count: jax.Array
  inner: Any


def gated(inner: optax.GradientTransformation, active: Callable[[jax.Array], jax.Array]
          ) -> optax.GradientTransformation:
  """Applies `inner` on steps where `active(step)` holds; elsewhere zero updates and `inner`'s state is kept
  (Adam moments and its step count do not advance on skipped steps)."""

  def init(params):
    return GatedState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    on = active(state.count)
    new_updates, new_inner = inner.update(updates, state.inner, params)
    out = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
    kept = jax.tree.map(lambda a, b: jnp.where(on, a, b), new_inner, state.inner)
    return out, GatedState(state.count + 1, kept)

  return optax.GradientTransformation(init, update)


def every(inner: optax.GradientTransformation, period: int) -> optax.GradientTransformation:
  """`inner` on steps 0, period, 2 * period, ..."""
  return gated(inner, lambda s: s % period == 0)


def in_phase(inner: optax.GradientTransformation, period: int, phase: int) -> optax.GradientTransformation:
  """`inner` during phase `phase` (0 or 1) of an alternation with `period` steps per phase (0: always)."""
  if period == 0:
    return inner
  return gated(inner, lambda s: (s // period) % 2 == phase)


def group_of(path: str) -> str:
  """The Master-ASR parameter group of a leaf path: select, scores, adapters, head or weights."""
  if re.search(r"(^|/)masks/[^/]+/select$", path) or path.startswith("new/rows"):
    return "select"
  if re.search(r"(^|/)masks/[^/]+/scores$", path) or path.startswith("new/scores"):
    return "scores"
  if re.search(r"(^|/)adapters/", path) or path.startswith("new/adapters"):
    return "adapters"
  if re.search(r"(^|/)head/", path):
    return "head"
  return "weights"


def _paths(tree) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, _: train_lib.path_str(p), tree)


def trainable_groups(method: str) -> tuple[str, ...]:
  """Which groups train in stage 1 for each method."""
  return {"dense": ("weights", "head"), "master_asr": ("weights", "head", "select", "scores"),
          "adapters": ("adapters", "head"), "s3router": ("scores", "head")}[method]


def labels_for(params, groups) -> Any:
  """Partition labels (True = trains) from group names."""
  return jax.tree.map(lambda p: group_of(p) in groups, _paths(params))


def stage1_optimizer(method: str, sched: ScheduleConfig) -> optax.GradientTransformation:
  """The stage-1 optimizer of `method` over its trainable leaves (module docstring)."""
  if method not in STAGE1_METHODS:
    raise ValueError(f"method={method!r}: expected one of {STAGE1_METHODS}")
  lr = tri_stage(sched)
  adam = lambda s: optax.adam(s)
  transforms = {"head": adam(lr), "adapters": adam(lr), "weights": adam(lr), "scores": adam(lr),
                "select": adam(sched.lr * sched.select_lr_mult)}
  if method == "master_asr":
    transforms["select"] = every(transforms["select"], sched.select_every)
    transforms["weights"] = in_phase(transforms["weights"], sched.phase_every, 0)
    transforms["scores"] = in_phase(transforms["scores"], sched.phase_every, 1)
  tx = optax.multi_transform(transforms, lambda tree: jax.tree.map(group_of, _paths(tree)))
  return optax.chain(optax.clip_by_global_norm(sched.clip), tx) if sched.clip else tx


# ------------------------------------------------------------------------------------------------------ losses


partition, combine = train_lib.partition, train_lib.combine


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static parts of the CTC objective: architecture, masks, SpecAugment (None = off)."""
  enc: model.EncoderConfig
  masks: artisan.MaskConfig = artisan.MaskConfig()
  spec_augment: frontend.SpecAugmentConfig | None = frontend.SpecAugmentConfig()


def ctc_objective(params, batch, rng, cfg: LossConfig, lang=None, head=None):
  """Mean over utterances of CTC NLL / transcript length (characters). Returns (loss, aux)."""
  feats = batch["feats"]
  if rng is not None and cfg.spec_augment is not None:
    feats = frontend.spec_augment(rng, feats, cfg.spec_augment)
  lang = batch["lang"] if lang is None else lang
  logits, mask = model.logits(params, feats, batch["frame_mask"], cfg.enc, cfg.masks, lang, head)
  nll = ctc.ctc_loss(logits, mask, batch["labels"], batch["label_mask"])
  chars = jnp.maximum(batch["label_mask"].sum(-1), 1.0)
  per_char = nll / chars
  return per_char.mean(), {"nll_per_char": per_char.mean(), "weight": jnp.float32(per_char.shape[0])}


def stage1_loss(cfg: LossConfig) -> Callable:
  """loss_fn(trainable, frozen, batch, rng) for stage 1 of any method."""
  def loss_fn(trainable, frozen, batch, rng):
    return ctc_objective(combine(trainable, frozen), batch, rng, cfg)

  return loss_fn


# ------------------------------------------------------------------------------------------- stage 2: new language


def new_head(rng: jax.Array, old_head: dict, vocab_size: int) -> dict:
  """A head for an extended vocabulary: old columns copied (ids never move), new columns random."""
  old = old_head["kernel"].shape[1]
  if vocab_size < old:
    raise ValueError(f"new_head: vocab_size={vocab_size} < the old head's {old}")
  d = old_head["kernel"].shape[0]
  extra = jax.random.normal(rng, (d, vocab_size - old)) / np.sqrt(d)
  return {"kernel": jnp.concatenate([old_head["kernel"], extra], 1),
          "bias": jnp.concatenate([old_head["bias"], jnp.zeros((vocab_size - old,))])}


def new_language(rng: jax.Array, method: str, params: dict, cfg: LossConfig, vocab_size: int):
  """Stage-2 parameters for one new language.

  Returns:
    (tree, labels, cfg2, lang): tree = {"base": the stage-1 params (frozen), "new": the new language's leaves},
    labels (True = trains), the LossConfig of the merged model, and the new language's id.
  """
  if method not in STAGE2_METHODS:
    raise ValueError(f"method={method!r}: expected one of {STAGE2_METHODS}")
  k_head, k_new = jax.random.split(rng)
  head = new_head(k_head, params["head"], vocab_size)
  new, masks, enc = {"head": head}, cfg.masks, cfg.enc
  if method in ("master_asr", "master_asr_head_only"):
    if masks.kind != "artisan":
      raise ValueError(f"stage 2 {method} needs an artisan model, got masks.kind={masks.kind!r}")
    lang = masks.num_languages
    keys = jax.random.split(k_new, len(masks.targets))
    new["rows"] = {t: jax.random.normal(k, params["masks"][t]["select"][:, 0].shape)
                   for t, k in zip(masks.targets, keys)}
    masks = dataclasses.replace(masks, num_languages=lang + 1)
  elif method == "adapters":
    lang = enc.adapter_languages
    new["adapters"] = model.init_adapters(k_new, dataclasses.replace(enc, adapter_languages=1))
    enc = dataclasses.replace(enc, adapter_languages=lang + 1)
  elif method == "s3router":
    if masks.kind != "s3router":
      raise ValueError(f"stage 2 s3router needs an s3router model, got masks.kind={masks.kind!r}")
    lang = masks.num_languages
    keys = jax.random.split(k_new, len(masks.targets))
    new["scores"] = {t: artisan.init_scores(k, params["layers"][t]["kernel"], 1, masks.init_noise)
                     for t, k in zip(masks.targets, keys)}
    masks = dataclasses.replace(masks, num_languages=lang + 1)
  else:  # full_ft: the dense model's weights train too, under a new head
    lang = 0
  tree = {"base": params, "new": new}
  train_base = method == "full_ft"
  labels = {"base": jax.tree.map(lambda p: train_base and group_of(p) != "head", _paths(params)),
            "new": jax.tree.map(lambda _: True, new)}
  if method == "master_asr_head_only":
    labels["new"]["rows"] = jax.tree.map(lambda _: False, new["rows"])
  return tree, labels, dataclasses.replace(cfg, enc=enc, masks=masks), lang


def merge(tree: dict) -> tuple[dict, dict]:
  """{"base", "new"} -> (the merged params of the larger model, the new language's head)."""
  params, new = dict(tree["base"]), tree["new"]
  if "rows" in new:
    params["masks"] = {t: dict(e, select=jnp.concatenate([e["select"], new["rows"][t][:, None]], 1))
                       for t, e in params["masks"].items()}
  if "scores" in new:
    params["masks"] = {t: dict(e, scores=jnp.concatenate([e["scores"], new["scores"][t]], 1))
                       for t, e in params["masks"].items()}
  if "adapters" in new:
    params["adapters"] = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 0), params["adapters"],
                                      new["adapters"])
  return params, new["head"]


def stage2_loss(cfg2: LossConfig, lang: int) -> Callable:
  def loss_fn(trainable, frozen, batch, rng):
    params, head = merge(combine(trainable, frozen))
    return ctc_objective(params, batch, rng, cfg2, lang=jnp.int32(lang), head=head)

  return loss_fn


def stage2_optimizer(sched: ScheduleConfig) -> optax.GradientTransformation:
  """Adam; selection rows at alpha x lr (every step: a single row has no collapse problem to damp)."""
  lr = tri_stage(sched)
  tx = optax.multi_transform(
      {"select": optax.adam(sched.lr * sched.select_lr_mult), "head": optax.adam(lr), "weights": optax.adam(lr),
       "scores": optax.adam(lr), "adapters": optax.adam(lr)},
      lambda tree: jax.tree.map(group_of, _paths(tree)))
  return optax.chain(optax.clip_by_global_norm(sched.clip), tx) if sched.clip else tx


# ----------------------------------------------------------------------------------------- parameter accounting


def accounting(method: str, params: dict, cfg: LossConfig, stage2_new: dict | None = None) -> dict:
  """Trainable and stored parameters.

  Returns {"encoder": backbone params (layers, frontend, no masks / adapters / head), "shared_stored": what all
  languages share, "per_language_stored": extra storage per language (a binary mask counts one entry per
  weight), "stage2_trainable": trainable params of adding a language (if `stage2_new` is given)}.
  """
  backbone = {k: v for k, v in params.items() if k not in ("masks", "adapters", "head")}
  enc = model.count(backbone)
  head = model.count(params["head"])
  out = {"encoder": enc, "head": head}
  if method == "dense" or method == "full_ft":
    out.update(shared_stored=enc + head, per_language_stored=enc + head if method == "full_ft" else 0)
  elif method.startswith("master_asr"):
    scores = sum(model.count(e["scores"]) for e in params["masks"].values())
    rows = sum(e["select"].shape[0] * e["select"].shape[2] for e in params["masks"].values())
    out.update(shared_stored=enc + scores + head, per_language_stored=rows, num_artisan_layers=sum(
        e["select"].shape[0] for e in params["masks"].values()), num_specialists=cfg.masks.num_specialists)
  elif method == "adapters":
    per = model.count(params["adapters"]) // cfg.enc.adapter_languages
    out.update(shared_stored=enc + head, per_language_stored=per)
  elif method == "s3router":
    per = sum(model.count(e["scores"]) for e in params["masks"].values()) // cfg.masks.num_languages
    out.update(shared_stored=enc + head, per_language_stored=per)
  if stage2_new is not None:
    out["stage2_trainable"] = model.count(stage2_new)
  return out


# ------------------------------------------------------------------------------------------------------ fitting


def fit(loss_fn: Callable, params, labels, optimizer: optax.GradientTransformation, batch_at: Callable,
        steps: int, seed: int = 0, log_every: int = 50, progress: bool = False, run_dir: str | None = None,
        checkpoint_dir: str | None = None):
  """Trains with lacax's one loop (`lacax.train.Trainer`). Returns (params, losses [steps]).

  Raises FloatingPointError if a loss is non-finite (never a silent NaN run).
  """
  state = train_lib.create_train_state(params, optimizer, labels=labels, seed=seed)
  trainer = train_lib.Trainer(loss_fn, optimizer, train_lib.TrainConfig(steps=steps, log_every=log_every,
                                                                        progress=progress),
                              labels=labels, tokens_of=lambda b: int(np.asarray(b["label_mask"]).sum()))
  state, records = trainer.fit(state, batch_at, run_dir=run_dir, checkpoint_dir=checkpoint_dir)
  losses = np.asarray([r["loss"] for r in records if "loss" in r], np.float32)
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"training loss became non-finite at step {int(np.argmin(np.isfinite(losses)))}")
  return state.params, losses
