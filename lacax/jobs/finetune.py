"""The `finetune` job: full or LoRA fine-tuning of a Llama-family model (SmolLM2 by default) with lacax.train.

Loads the model and its tokenizer, builds packed text or answer-only instruction batches, holds rows out for
evaluation, trains (resuming from the run's checkpoints if the same command ran before), and writes to the run
directory: `metrics.jsonl`, `loss_curve.png`, the final parameters (`params/`, and for LoRA `lora/` plus,
with `export.merged`, the merged model) and `results.json` (held-out loss and perplexity before and after,
tokens/s, trainable parameter count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lacax import jobs
from lacax import train
from lacax.train import lm

# Config sections that do not change what a run computes (so they do not change its checkpoint directory).
_NOT_IN_HASH = ("results_dir", "train.progress", "train.log_every", "train.checkpoint_dir", "export")


def config_hash(config: ml_collections.ConfigDict) -> str:
  """12 hex digits identifying what a run computes (its checkpoint directory's name)."""
  flat = train.checkpoint.flatten_config(config)
  kept = {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in _NOT_IN_HASH)}
  return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def _data_kind(config) -> str:
  kind, path = config.data.kind, config.data.path
  if kind not in ("auto", "text", "instruction"):
    raise ValueError(f"data.kind={kind!r} is unknown; expected 'auto', 'text' or 'instruction'")
  if kind != "auto":
    return kind
  if path and os.path.isfile(path) and path.endswith((".json", ".jsonl")):
    records = train.load_records(path)
    first = records[0][1] if records else {}
    if isinstance(first, dict) and "instruction" in first:
      return "instruction"
  return "text"


def build_data(config, tokenizer) -> tuple[train.SequenceDataset, train.SequenceDataset, str]:
  """(train rows, held-out rows, kind)."""
  d = config.data
  kind = _data_kind(config)
  if kind == "instruction":
    ds = train.instruction_dataset(tokenizer, d.path, seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed)
  else:
    ds = train.text_dataset(tokenizer, d.path, seq_len=d.seq_len, batch_size=d.batch_size, field=d.field,
                            seed=d.seed, max_chars=d.max_chars)
  train_ds, held = ds.split(d.eval_rows)
  return train_ds, held, kind


def _window(spec: str) -> tuple[int, int] | None:
  if not spec:
    return None
  try:
    start, stop = (int(x) for x in spec.split(":"))
  except ValueError:
    raise ValueError(f"train.layer_window={spec!r} must read 'start:stop'") from None
  return start, stop


def _patterns(spec: Any):
  if spec in ("", "all", None):
    return "all"
  return tuple(p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip())


def lm_setup(config, model) -> lm.LMSetup:
  """The run's parameters, labels, loss and export, from the config's mode."""
  if config.mode == "full":
    return lm.full_setup(model, compute_dtype=config.train.compute_dtype, trainable=_patterns(config.train.trainable),
                         layer_window=_window(config.train.layer_window),
                         activation_dtype=config.train.activation_dtype)
  lc = config.lora
  targets = tuple(t.strip() for t in lc.targets.split(",") if t.strip()) if isinstance(lc.targets, str) else tuple(
      lc.targets)
  return lm.lora_setup(model, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=targets, seed=lc.seed,
                       compute_dtype=config.train.compute_dtype, layer_window=_window(config.train.layer_window),
                       export_merged=config.export.merged, activation_dtype=config.train.activation_dtype)


def _table(rows: list[tuple[str, str]]) -> str:
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  if config.mode not in ("full", "lora"):
    raise ValueError(f"mode={config.mode!r} is unknown; expected 'full' or 'lora'")
  lm.check_precision(config.train.compute_dtype, config.train.activation_dtype)
  model = jobs.model_from_config(config)
  mesh_rules = model.mesh_rules
  if model.tokenizer is None:
    raise ValueError(f"model.path={config.model.path!r} has no tokenizer; the finetune job needs one")
  train_ds, held, kind = build_data(config, model.tokenizer)
  setup = lm_setup(config, model)
  params, labels, loss_fn, export = setup.params, setup.labels, setup.loss_fn, setup.export

  steps = config.train.steps
  tcfg = train.train_config_from(config.train)
  opt, schedule = train.make_optimizer(train.optimizer_config_from(config.optimizer), steps)
  state = train.create_train_state(params, opt, labels=labels, seed=config.train.seed)
  trainable_count, total_count = train.count_params(state.trainable), train.count_params(state.params)
  trainer = train.Trainer(loss_fn, opt, tcfg, schedule=schedule, labels=labels, mesh_rules=mesh_rules,
                          param_sharding=lm.param_sharding(mesh_rules) if mesh_rules is not None else None)
  eval_batches = held.eval_batches(config.train.eval_batches)

  home = config.train.checkpoint_dir and os.path.dirname(os.path.abspath(config.train.checkpoint_dir))
  if not home:
    home = os.path.join(config.results_dir, config.experiment, "runs", config_hash(config))
  os.makedirs(home, exist_ok=True)
  ckpt_dir = config.train.checkpoint_dir or os.path.join(home, "checkpoints")
  resumed_from = None
  if os.path.isdir(ckpt_dir):
    existing = train.Checkpointer(ckpt_dir)
    resumed_from = existing.latest_step()
    existing.close()
  placed = trainer.place(state)
  before = trainer.evaluate(placed, eval_batches)
  t0 = time.perf_counter()
  state, records = trainer.fit(placed, train_ds.batch, run_dir=home, checkpoint_dir=ckpt_dir,
                               eval_batches=eval_batches, run_config=config)
  wall = time.perf_counter() - t0
  after = trainer.evaluate(state, eval_batches)
  for name in ("metrics.jsonl", "loss_curve.png"):
    if os.path.exists(os.path.join(home, name)):
      shutil.copy(os.path.join(home, name), os.path.join(run_dir, name))
  exported = export(state, run_dir) if config.export.params else {}

  all_records = train.read_metrics(os.path.join(home, "metrics.jsonl"))
  step_records = [r for r in all_records if "loss" in r]
  # Steady-state throughput: the logged windows after the first (which includes compilation).
  steady = [r["tokens_per_s"] for r in step_records if r["step"] > tcfg.log_every]
  figures = {
      "mode": config.mode, "data_kind": kind, "train_rows": train_ds.num_rows, "eval_rows": held.num_rows,
      "seq_len": train_ds.seq_len, "batch_size": train_ds.batch_size, "steps": steps,
      "resumed_from_step": resumed_from,
      "trainable_params": trainable_count, "total_params": total_count,
      "eval_loss_before": before.get("loss"), "eval_loss_after": after.get("loss"),
      "eval_ppl_before": math.exp(before["loss"]) if before else None,
      "eval_ppl_after": math.exp(after["loss"]) if after else None,
      "first_train_loss": step_records[0]["loss"] if step_records else None,
      "last_train_loss": step_records[-1]["loss"] if step_records else None,
      "tokens_per_s": float(np.median(steady)) if steady else None, "wall_s": wall,
      "checkpoint_dir": os.path.abspath(ckpt_dir), "exported": exported,
  }
  print(_table([
      ("model", f"{model.cfg.name} ({config.mode}, {trainable_count:,} of {total_count:,} parameters trained)"),
      ("data", f"{kind}: {train_ds.num_rows} rows x {train_ds.seq_len} tokens, {held.num_rows} held out"),
      ("held-out loss", f"{figures['eval_loss_before']:.4f} -> {figures['eval_loss_after']:.4f} (ppl "
                        f"{figures['eval_ppl_before']:.2f} -> {figures['eval_ppl_after']:.2f})"),
      ("train loss", f"{figures['first_train_loss']} -> {figures['last_train_loss']}"),
      ("tokens/s", f"{figures['tokens_per_s']}"),
      ("checkpoints", figures["checkpoint_dir"]),
  ]))
  logging.info("finetune: %s", figures)
  return {"figures": figures, "model_fingerprint": model.fingerprint()}
