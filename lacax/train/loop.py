"""The training loop: a jitted, donated step over pure functions, and `Trainer.fit` around it.

The loss contract (model-agnostic; every adaptation method of lacax plugs in here):

    loss_fn(trainable, frozen, batch, rng) -> (loss, aux)

* `trainable`, `frozen`: the two halves of the parameter pytree (`lacax.train.state.partition`), already cast
  to the compute dtype; `lacax.train.state.combine` joins them.
* `batch`: a pytree of arrays (one micro-batch); `rng`: a PRNG key, or None at evaluation (deterministic).
* `loss`: a float32 scalar, the *mean* over `aux["weight"]` units (e.g. target tokens); `aux`: scalar
  metrics. With `weight` given, gradient accumulation weights micro-batches by it, so k micro-batches give the
  gradient of one k-times larger batch even when their token counts differ.
* optional attribute `loss_fn.compute_dtype` (a dtype name): the loss handles mixed precision itself, casting
  each weight where it uses it (the Llama losses of `lacax.train.losses` with `dot_dtype`). The step then hands
  it the parameters uncast, and `TrainConfig.compute_dtype` must be "" or the same name. Casting inside the
  layer scan is what makes float32 master weights train fast in bfloat16 on XLA:CPU: a cast of the whole
  stacked pytree outside the scan makes each layer's gradient a bfloat16 slice of a stacked gradient, and XLA:CPU
  updates such a stack by converting all of it to float32 and back for every layer.

The step (`make_train_step`): gradients of the trainable half only, accumulated over `accum_steps` micro-batches
with `lax.scan` (one compiled body), row masks applied (frozen layer rows stay bit-identical), the optax update,
and the state buffers donated, so a step holds one copy of the parameters and optimizer state. Mixed precision:
the state keeps float32 master weights; the loss sees them cast to `compute_dtype` (e.g. bfloat16), and the
cast's transpose returns float32 gradients; or the loss casts them itself where it uses them (its
`compute_dtype` attribute, above).

Sharded training: give `mesh_rules` (`lacax.sharding.MeshRules`) and place the state with `shard_state` (FSDP:
parameters, and the optimizer moments that mirror them, split on `embed` over the fsdp axis) and the batch
with `shard_batch` (rows over data + fsdp). The compiled step keeps that layout from one step to the next.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lacax.model.config import dtype_of
from lacax.train import checkpoint as ckpt_lib
from lacax.train import metrics as metrics_lib
from lacax.train.state import TrainState, apply_masks, cast_floats, update_masks

Batch = Any
LossFn = Callable[[Any, Any, Batch, jax.Array | None], tuple[jax.Array, Mapping[str, jax.Array]]]

def compute_dtype_of(name: str | None) -> Any:
  return dtype_of(name, "train.compute_dtype")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How `Trainer.fit` runs.

  Attributes:
    steps: optimizer steps in all (a resumed run continues up to this count).
    accum_steps: micro-batches per step (the batch's leading axis is split into this many).
    compute_dtype: "" (the master dtype, float32), "bfloat16" or "float16": what the loss computes in.
    log_every: steps between metric fetches (every step is still written to metrics.jsonl).
    eval_every: steps between evaluations (0: only at the end, if evaluation batches are given).
    checkpoint_every: steps between checkpoints (0: only at the end and on SIGINT / SIGTERM).
    keep_checkpoints: how many checkpoints to keep.
    save_frozen: write the frozen parameters into checkpoints too.
    progress: show a tqdm bar (loss, tokens/s).
  """

  steps: int
  accum_steps: int = 1
  compute_dtype: str = ""
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  save_frozen: bool = False
  progress: bool = True

  def __post_init__(self):
    for field in ("steps", "accum_steps", "log_every", "keep_checkpoints"):
      if getattr(self, field) < 1:
        raise ValueError(f"train.{field}={getattr(self, field)} must be >= 1")
    for field in ("eval_every", "checkpoint_every"):
      if getattr(self, field) < 0:
        raise ValueError(f"train.{field}={getattr(self, field)} must be >= 0 (0 = off)")
    compute_dtype_of(self.compute_dtype)


def train_config_from(section: Any) -> TrainConfig:
  """A `TrainConfig` from a config section (the fields of TrainConfig it holds; other fields are ignored)."""
  values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  known = {f.name for f in dataclasses.fields(TrainConfig)}
  return TrainConfig(**{k: v for k, v in values.items() if k in known})


def _split_micro(batch: Batch, k: int) -> Batch:
  """[k * m, ...] -> [k, m, ...]: micro-batch j holds rows j, j + k, ... (each device's rows spread over all)."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch leading size {x.shape[0]} is not divisible by train.accum_steps={k}")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

  return jax.tree_util.tree_map(split, batch)


def _weight(aux: Mapping[str, jax.Array]) -> jax.Array:
  return jnp.asarray(aux.get("weight", 1.0), jnp.float32)


def param_cast_dtype(loss_fn: LossFn, compute_dtype: Any) -> Any:
  """The dtype the step casts the parameters to before `loss_fn` (None: no cast; module docstring)."""
  own = getattr(loss_fn, "compute_dtype", None)
  if own is None:
    return compute_dtype
  if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.dtype(own):
    raise ValueError(f"train.compute_dtype={jnp.dtype(compute_dtype).name!r} but the loss computes in {own!r} "
                     "itself (its setup's compute_dtype); give both the same value, or '' here")
  return None


def make_grad_fn(loss_fn: LossFn, *, accum_steps: int = 1, compute_dtype: Any = None,
                 micro_constraint: Callable[[Batch], Batch] | None = None) -> Callable:
  """(trainable, frozen, batch, rng) -> (loss, aux, grads): the accumulated gradient of the trainable half.

  With `accum_steps` = k > 1 the batch's leading axis is split into k micro-batches (`_split_micro`) and the
  result is the `weight`-weighted mean of their losses, metrics and gradients (`weight` itself is summed).
  """
  compute_dtype = param_cast_dtype(loss_fn, compute_dtype)

  def one(trainable, frozen, batch, rng):
    def f(tr):
      loss, aux = loss_fn(cast_floats(tr, compute_dtype), cast_floats(frozen, compute_dtype), batch, rng)
      return loss.astype(jnp.float32), aux

    (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(trainable)
    return loss, dict(aux), grads

  def grad_fn(trainable, frozen, batch, rng):
    if accum_steps == 1:
      return one(trainable, frozen, batch, rng)
    micro = _split_micro(batch, accum_steps)
    abstract = jax.eval_shape(lambda b: one(trainable, frozen, b, rng),
                              jax.tree_util.tree_map(lambda x: x[0], micro))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), abstract)

    def body(carry, inputs):
      loss_sum, aux_sum, grad_sum = carry
      i, mb = inputs
      if micro_constraint is not None:
        mb = micro_constraint(mb)
      loss, aux, grads = one(trainable, frozen, mb, None if rng is None else jax.random.fold_in(rng, i))
      w = _weight(aux)
      aux_sum = {k: aux_sum[k] + (v if k == "weight" else w * v) for k, v in aux.items()}
      grad_sum = jax.tree_util.tree_map(lambda s, g: s + w * g.astype(jnp.float32), grad_sum, grads)
      return (loss_sum + w * loss, aux_sum, grad_sum), None

    init = (jnp.zeros((), jnp.float32), zeros[1], zeros[2])
    (loss_sum, aux_sum, grad_sum), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
    total = aux_sum["weight"] if "weight" in aux_sum else jnp.float32(accum_steps)
    aux = {k: v if k == "weight" else v / total for k, v in aux_sum.items()}
    grads = jax.tree_util.tree_map(lambda g, t: (g / total).astype(t.dtype), grad_sum, trainable)
    return loss_sum / total, aux, grads

  return grad_fn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, accum_steps: int = 1,
                    compute_dtype: Any = None, labels: Any = None, schedule: Callable | None = None,
                    mesh_rules: Any = None, state_shardings: Any = None, donate: bool = True) -> Callable:
  """The jitted step `(state, batch) -> (state, metrics)`, the state's mutable part donated (not `frozen`).

  Args:
    loss_fn: the loss (contract in the module docstring).
    optimizer: the optax transformation the state was created with.
    accum_steps: micro-batches per step.
    compute_dtype: dtype the loss computes in (None: the master weights' own).
    labels: the labels the state was partitioned with; row masks among them freeze rows of stacked leaves.
    schedule: the learning-rate schedule, to report `lr` (optional).
    mesh_rules: on a mesh: micro-batches constrained to rows over the data axes.
    state_shardings: the state's shardings (`jax.tree.map(lambda x: x.sharding, state)`), kept as the output
      layout so that every step compiles once and donation reuses the buffers.
    donate: donate the state's buffers.

  Metrics: loss, grad_norm (after masking, before clipping), lr, and the loss's own aux (weight summed).
  """
  micro_constraint = None
  if mesh_rules is not None:
    micro_constraint = lambda mb: jax.tree_util.tree_map(
        lambda x: mesh_rules.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
  grad_fn = make_grad_fn(loss_fn, accum_steps=accum_steps, compute_dtype=compute_dtype,
                         micro_constraint=micro_constraint)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    masks = None if labels is None else update_masks(state.trainable, labels)
    rng = jax.random.fold_in(state.rng, state.step)
    loss, aux, grads = grad_fn(state.trainable, state.frozen, batch, rng)
    grads = apply_masks(grads, masks)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    updates = apply_masks(updates, masks)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, frozen=None)
    return new, metrics

  def split_step(mutable: TrainState, frozen: Any, batch: Batch):
    return step(mutable.replace(frozen=frozen), batch)

  kwargs = {}
  if state_shardings is not None:
    kwargs["out_shardings"] = (state_shardings.replace(frozen=None), None)
  # The frozen half is a separate, undonated argument: it is read, never written, and stays valid.
  jitted = jax.jit(split_step, donate_argnums=(0,) if donate else (), **kwargs)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    new, metrics = jitted(state.replace(frozen=None), state.frozen, batch)
    return new.replace(frozen=state.frozen), metrics

  train_step.jitted = jitted
  return train_step


def make_eval_step(loss_fn: LossFn, *, compute_dtype: Any = None) -> Callable:
  """Jitted `(state, batch) -> (loss, aux)` with rng=None (deterministic)."""
  compute_dtype = param_cast_dtype(loss_fn, compute_dtype)

  def evaluate(state: TrainState, batch: Batch):
    loss, aux = loss_fn(cast_floats(state.trainable, compute_dtype), cast_floats(state.frozen, compute_dtype),
                        batch, None)
    return loss.astype(jnp.float32), dict(aux)

  return jax.jit(evaluate)


def evaluate(eval_step: Callable, state: TrainState, batches: Sequence[Batch]) -> dict[str, float]:
  """The `weight`-weighted mean loss (and aux metrics) over evaluation batches."""
  total_w, sums = 0.0, {}
  for batch in batches:
    loss, aux = jax.device_get(eval_step(state, batch))
    w = float(aux.get("weight", 1.0))
    total_w += w
    sums["loss"] = sums.get("loss", 0.0) + w * float(loss)
    for k, v in aux.items():
      if k != "weight" and np.ndim(v) == 0:
        sums[k] = sums.get(k, 0.0) + w * float(v)
  if total_w == 0:
    return {}
  return {k: v / total_w for k, v in sums.items()} | {"weight": total_w}


# ----------------------------------------------------------------------------------------------------------------
# Placement on a mesh.
# ----------------------------------------------------------------------------------------------------------------


def state_shardings(state: TrainState, optimizer: optax.GradientTransformation, mesh_rules: Any,
                    param_sharding: Callable[[Any], Any] | None = None) -> Any:
  """NamedShardings for every leaf of `state`: parameters by the mesh rules, optimizer moments as the
  parameters they mirror, everything else (step, rng, counts) replicated.

  Args:
    param_sharding: params pytree -> shardings pytree (default `mesh_rules.param_shardings`, Llama names).
  """
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  shard_params = param_sharding or mesh_rules.param_shardings
  replicated = NamedSharding(mesh_rules.mesh, PartitionSpec())
  trainable_sh = shard_params(state.trainable)
  frozen_sh = shard_params(state.frozen)
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, trainable_sh,
                                 transform_non_params=lambda _: replicated)
  return state.replace(step=replicated, trainable=trainable_sh, frozen=frozen_sh, opt_state=opt_sh,
                       rng=replicated)


def shard_state(state: TrainState, shardings: Any) -> TrainState:
  """`state` placed by `shardings` (from `state_shardings`)."""
  return jax.tree_util.tree_map(jax.device_put, state, shardings)


def shard_batch(batch: Batch, mesh_rules: Any) -> Batch:
  """Rows of every batch array split over the rules' batch axes (data + fsdp)."""
  return jax.tree_util.tree_map(lambda x: mesh_rules.put(np.asarray(x), ("batch",) + (None,) * (np.ndim(x) - 1)),
                                batch)


# ----------------------------------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------------------------------


def default_tokens_of(batch: Batch) -> int:
  """Tokens a batch holds: real positions if it has `positions`, else the size of `tokens`, else rows."""
  if isinstance(batch, Mapping):
    if "positions" in batch:
      return int(np.sum(np.asarray(batch["positions"]) >= 0))
    if "tokens" in batch:
      return int(np.size(batch["tokens"]))
  return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


class _InterruptFlag:
  """Turns SIGINT / SIGTERM (Ctrl-C, a pre-empted VM) into a flag the loop checks between steps: the step in
  flight completes, a checkpoint is written, then KeyboardInterrupt. A second signal stops at once."""

  _SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.raised = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self._SIGNALS}
    return self

  def _handle(self, signum, frame):
    del signum, frame
    if self.raised:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.raised = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class Trainer:
  """Runs a loss to convergence: steps, evaluation, metrics, checkpoints and resume.

  Args:
    loss_fn: the loss (contract in the module docstring).
    optimizer, schedule: from `lacax.train.optim.make_optimizer`.
    config: a `TrainConfig`.
    labels: the labels the state was partitioned with (row masks freeze layer rows).
    mesh_rules: train on this mesh (the state and batches are placed by `fit`).
    param_sharding: params -> shardings for parameter pytrees that are not Llama-named (see `state_shardings`).
    tokens_of: batch -> number of tokens (for tokens/s); default `default_tokens_of`.
  """

  def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, config: TrainConfig, *,
               schedule: Callable | None = None, labels: Any = None, mesh_rules: Any = None,
               param_sharding: Callable | None = None, tokens_of: Callable[[Batch], int] | None = None):
    self.loss_fn = loss_fn
    self.optimizer = optimizer
    self.schedule = schedule
    self.config = config
    self.labels = labels
    self.mesh_rules = mesh_rules
    self.param_sharding = param_sharding
    self.tokens_of = tokens_of or default_tokens_of
    self.compute_dtype = compute_dtype_of(config.compute_dtype)
    self._step_fn = None
    self._eval_fn = make_eval_step(loss_fn, compute_dtype=self.compute_dtype)

  def place(self, state: TrainState) -> TrainState:
    """The state on the mesh (a no-op without one); builds the step for its layout."""
    shardings = None
    if self.mesh_rules is not None:
      shardings = state_shardings(state, self.optimizer, self.mesh_rules, self.param_sharding)
      state = shard_state(state, shardings)
    self._step_fn = make_train_step(self.loss_fn, self.optimizer, accum_steps=self.config.accum_steps,
                                    compute_dtype=self.compute_dtype, labels=self.labels, schedule=self.schedule,
                                    mesh_rules=self.mesh_rules, state_shardings=shardings)
    return state

  def _batch(self, batch: Batch) -> Batch:
    if self.mesh_rules is not None:
      return shard_batch(batch, self.mesh_rules)
    return jax.tree_util.tree_map(jnp.asarray, batch)

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (the state must come from `place`)."""
    if self._step_fn is None:
      state = self.place(state)
    return self._step_fn(state, self._batch(batch))

  def evaluate(self, state: TrainState, batches: Sequence[Batch]) -> dict[str, float]:
    return evaluate(self._eval_fn, state, [self._batch(b) for b in batches])

  def fit(self, state: TrainState, batch_at: Callable[[int], Batch], *, run_dir: str | None = None,
          checkpoint_dir: str | None = None, eval_batches: Sequence[Batch] = (), run_config: Any = None,
          extra_meta: Mapping[str, Any] | None = None) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains up to `config.steps`, resuming from the latest checkpoint in `checkpoint_dir` if there is one.

    Args:
      state: the fresh state (`create_train_state`); replaced by the checkpoint's when resuming.
      batch_at: step index -> batch (a pure function of the step, so a resumed run sees the same data).
      run_dir: where metrics.jsonl and loss_curve.png go (None: nowhere).
      checkpoint_dir: where checkpoints go (None: no checkpoints, no resume).
      eval_batches: evaluation batches (evaluated every `eval_every` steps and at the end).
      run_config: the run's config, recorded in checkpoints and compared on resume.
      extra_meta: more JSON recorded with every checkpoint.

    Returns:
      (final state, the records written this call).

    Raises:
      KeyboardInterrupt: on SIGINT or SIGTERM, after the step in flight and a checkpoint at it.
    """
    cfg = self.config
    state = self.place(state)
    ckpt = None
    if checkpoint_dir:
      ckpt = ckpt_lib.Checkpointer(checkpoint_dir, keep=cfg.keep_checkpoints, config=run_config,
                                   save_frozen=cfg.save_frozen)
      if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        logging.info("resumed from %s", ckpt.step_dir(int(state.step)))
    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricsWriter(os.path.join(run_dir, "metrics.jsonl"), resume_step=start if start else None
                                       ) if run_dir else None
    records: list[dict[str, Any]] = []

    def emit(record):
      records.append(record)
      if writer is not None:
        writer.write(record)

    bar = None
    if cfg.progress and start < cfg.steps:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    pending: list[tuple[int, Any, int]] = []
    window_start, window_tokens = time.perf_counter(), 0
    last_loss = math.nan

    def flush():
      nonlocal window_start, window_tokens, last_loss
      if not pending:
        return
      fetched = jax.device_get([m for _, m, _ in pending])
      elapsed = max(time.perf_counter() - window_start, 1e-9)
      tps = window_tokens / elapsed
      for (s, _, n), m in zip(pending, fetched):
        record = {"step": s, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0}, "tokens": n,
                  "tokens_per_s": tps}
        emit(record)
        last_loss = record["loss"]
      if bar is not None:
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tps:,.0f}")
        bar.update(len(pending))
      pending.clear()
      window_start, window_tokens = time.perf_counter(), 0

    def run_eval(s):
      if not eval_batches:
        return
      result = self.evaluate(state, eval_batches)
      emit({"step": s, **{f"eval_{k}": v for k, v in result.items()}})
      logging.info("step %d: eval %s", s, result)

    try:
      with _InterruptFlag() as interrupt:
        for s in range(start, cfg.steps):
          batch = batch_at(s)
          n = self.tokens_of(batch)
          state, m = self._step_fn(state, self._batch(batch))
          pending.append((s + 1, m, n))
          window_tokens += n
          done = s + 1
          if done % cfg.log_every == 0 or done == cfg.steps or interrupt.raised:
            flush()
          if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            flush()
            run_eval(done)
          if ckpt is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or interrupt.raised):
            ckpt.save(state, extra_meta)
            ckpt.wait()
          if interrupt.raised:
            flush()
            logging.warning("interrupted at step %d; checkpoint saved in %s", done,
                            ckpt.directory if ckpt else "(no checkpoint_dir)")
            raise KeyboardInterrupt
      flush()
      run_eval(int(jax.device_get(state.step)))
      if ckpt is not None:
        ckpt.save(state, extra_meta)
    finally:
      if bar is not None:
        bar.close()
      if ckpt is not None:
        ckpt.close()
      if run_dir:
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
          metrics_lib.plot_loss_curve(metrics_lib.read_metrics(path), os.path.join(run_dir, "loss_curve.png"))
    return state, records
