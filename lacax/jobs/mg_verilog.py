"""The `mg_verilog` job: balanced vs single-level fine-tuning (MG-Verilog, arXiv 2407.01910), scored per level.

1. Generates the synthetic multi-grained corpus (`lacax.hw.mg_verilog.tasks`), holds out whole template
   families (`split.held_out_families`, never trained on) and a fraction of every other template's parameter
   sets (`split.test_fraction`); the rest is the training set.
2. For each variant in `variants`: "base" (the pretrained model, no fine-tuning) or a sampler mode ("union",
   "random_level", "weighted", "single:<level>"), answer-only LoRA fine-tuning from the same base weights
   (`lacax.hw.mg_verilog.finetune`).
3. Evaluates every variant with the local backend (`lacax.hw.backends.local`) on both held-out sets at each
   description level (pass@k with `eval.n` samples per task, simulated in the sandbox), and on VerilogEval v2 /
   RTLLM when their paths are given (`benchmarks.*`).

Writes `results.json` (every figure, training losses, pairs per level), per-set JSONL files, `per_level.png`
(pass@1 per level, one bar per variant, one panel per held-out set) and prints the table.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import ml_collections

from lacax import jobs
from lacax import runs
from lacax.hw.backends import base
from lacax.hw.bench import harness, loaders
from lacax.hw.mg_verilog import finetune as ft
from lacax.hw.mg_verilog import tasks as tasks_lib
from lacax.model import lora as lora_lib


def _sampling(c) -> base.Sampling:
  return base.Sampling(n=int(c.n), temperature=float(c.temperature), top_p=float(c.top_p),
                       max_tokens=int(c.max_tokens), stop=tuple(c.stop), seed=int(c.seed))


def _plot(rows, sets, levels, variants, path, k):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.6), squeeze=False)
  width = 0.8 / max(1, len(variants))
  for ax, name in zip(axes[0], sets):
    for j, v in enumerate(variants):
      ys = [next((r[f"pass@{k}"] or 0.0 for r in rows if r["variant"] == v and r["set"] == name and r["level"] == l),
                 0.0) for l in levels]
      ax.bar(np.arange(len(levels)) + j * width, ys, width, label=v)
    ax.set_xticks(np.arange(len(levels)) + 0.4 - width / 2)
    ax.set_xticklabels(levels)
    ax.set_ylim(0, 1)
    ax.set_title(f"{name}: pass@{k} per description level")
  axes[0][0].set_ylabel(f"pass@{k}")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def _variant_unit(model, variant, config, train_tasks, sets, levels, bench_problems, sampling, ks, lora,
                  run_dir) -> dict[str, Any]:
  """Fine-tunes one variant ("base": none) and evaluates it on every held-out set and benchmark."""
  from lacax.hw.backends.local import LocalBackend  # pylint: disable=g-import-not-at-top

  tv = time.monotonic()
  rows, training = [], None
  if variant == "base":
    params = model.params
  else:
    fcfg = ft.FinetuneConfig(mode=variant, epochs=config.train.epochs, steps=config.train.steps,
                             batch_size=config.train.batch_size, accum_steps=config.train.accum_steps,
                             seq_len=config.train.seq_len, learning_rate=config.train.learning_rate,
                             warmup_steps=config.train.warmup_steps, lora=lora,
                             weights=dict(config.train.weights) if variant == "weighted" else None,
                             compute_dtype=config.train.compute_dtype, seed=config.data.seed)
    vdir = os.path.join(run_dir.path, "train_" + variant.replace(":", "_"))
    os.makedirs(vdir, exist_ok=True)
    params, info = ft.finetune(model, train_tasks, fcfg, run_dir=vdir, levels=levels)
    training = {k: v for k, v in info.items() if k != "records"}
  backend = LocalBackend(dataclasses.replace(model, params=params), max_batch=config.eval.max_batch)
  # One harness call for every (set, level): one batch of prompts, so the local model compiles once or twice.
  keyed = [(set_name, level, t.problem(level)) for set_name, ts in sets.items() for level in levels for t in ts]
  probs = [dataclasses.replace(p, task_id=f"{set_name}/{p.task_id}") for set_name, _, p in keyed]
  rep = harness.evaluate(probs, backend, sampling, style="chat", system="", workers=config.workers or None,
                         batch_size=config.eval.batch_size)
  rep.write(run_dir.path, f"{variant.replace(':', '_')}__synthetic", ks=ks)
  for set_name in sets:
    for level in levels:
      rs = [r for (sn, lv, _), r in zip(keyed, rep.results) if sn == set_name and lv == level]
      sub = dataclasses.replace(rep, results=tuple(rs))
      rows.append({"variant": variant, "set": set_name, "level": level, "tasks": len(rs),
                   **{f"pass@{k}": sub.pass_at(k) for k in ks}, "categories": sub.categories()})
      logging.info("mg_verilog: %s", rows[-1])
  for bname, bprobs in bench_problems.items():
    rep = harness.evaluate(bprobs, backend, sampling, style="chat", system="", workers=config.workers or None,
                           batch_size=config.eval.batch_size)
    rep.write(run_dir.path, f"{variant.replace(':', '_')}__{bname}", ks=ks)
    rows.append({"variant": variant, "set": bname, "level": "benchmark", "tasks": len(bprobs),
                 **{f"pass@{k}": rep.pass_at(k) for k in ks}, "categories": rep.categories()})
  logging.info("mg_verilog: variant %s done in %.0fs", variant, time.monotonic() - tv)
  return {"rows": rows, "training": training}


def run(config: ml_collections.ConfigDict, run_dir: str | runs.RunDir) -> dict[str, Any]:
  run_dir = runs.as_run_dir(run_dir)
  t0 = time.monotonic()
  model = jobs.model_from_config(config)
  all_tasks = tasks_lib.generate(config.data.per_template, seed=config.data.seed)
  rest, family_test = tasks_lib.split(all_tasks, "family", held_out=tuple(config.split.held_out_families))
  train_tasks, param_test = tasks_lib.split(rest, "params", test_fraction=config.split.test_fraction,
                                            seed=config.data.seed)
  cap = int(config.eval.max_tasks_per_set or 0)
  sets = {"held_out_params": param_test[:cap] if cap else param_test,
          "held_out_families": family_test[:cap] if cap else family_test}
  empty = [k for k, v in sets.items() if not v]
  if empty:
    logging.warning("mg_verilog: held-out sets %s are empty (data.per_template=%d is too small to hold out "
                    "parameter sets); they are skipped", empty, config.data.per_template)
    sets = {k: v for k, v in sets.items() if v}
  levels = tuple(config.eval.levels)
  logging.info("mg_verilog: %d train tasks, held-out sets %s", len(train_tasks), {k: len(v) for k, v in sets.items()})
  bench_problems = {}
  if config.benchmarks.verilog_eval:
    bench_problems["verilog_eval_v2"] = loaders.verilog_eval(config.benchmarks.verilog_eval, "spec-to-rtl")
  if config.benchmarks.rtllm:
    bench_problems["rtllm_v2"] = loaders.rtllm(config.benchmarks.rtllm)
  lim = int(config.benchmarks.limit or 0)
  bench_problems = {k: (v[:lim] if lim else v) for k, v in bench_problems.items()}
  sampling = _sampling(config.eval)
  ks = tuple(k for k in config.eval.ks if k <= sampling.n)
  lora = lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                             dropout=config.lora.get("dropout", 0.0), targets=tuple(config.lora.targets))
  rows, training = [], {}
  for variant in config.variants:
    # One unit per variant (its fine-tune and every evaluation): a killed run resumes at the next variant.
    unit = run_dir.unit(f"variant:{variant}", lambda variant=variant: _variant_unit(
        model, variant, config, train_tasks, sets, levels, bench_problems, sampling, ks, lora, run_dir))
    rows.extend(unit["rows"])
    if unit["training"] is not None:
      training[variant] = unit["training"]
  cols = ["variant", "set", "level", "tasks", *(f"pass@{k}" for k in ks)]
  print(harness.table(rows, cols))
  for v, info in training.items():
    print(f"{v}: {info['pairs']} pairs {info['pairs_per_level']}, {info['steps']} steps, "
          f"loss {info['first_loss']:.3f} -> {info['last_loss']:.3f}")
  plot_error = runs.safe_plot("mg_verilog", _plot, rows, list(sets), levels, list(config.variants),
                              run_dir.file("per_level.png"), ks[0])
  return {"plot_error": plot_error, "rows": rows, "training": training, "train_tasks": len(train_tasks),
          "held_out": {k: [t.task_id for t in v] for k, v in sets.items()}, "sampling": sampling.to_json(),
          "backend": "local", "model": model.source, "wall_s": time.monotonic() - t0}
