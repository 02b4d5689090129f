"""Tuning memory and step time: Edge-LLM adaptive layer tuning vs LoRA through all layers vs full fine-tuning.

  python -m experiments.bench_edge_tuning [--modes=adaptive,lora_all,full] [--batch=1] [--seq_len=128]
      [--steps=2] [--warmup=1] [--stride=8] [--exit_head=copy] [--tiny]

The paper (arXiv 2406.15758) claims 4x less tuning memory and 2.92x speed-up against "vanilla tuning". All three
modes train the embedded SmolLM2-135M-Instruct (`--tiny`: a small random model) on the same batches through
`lacax.train` (AdamW, clip 1.0), LoRA rank `--lora_rank` on every projection (the reference's targets):

  adaptive  every window of `--stride` layers in turn (`lacax.compress.tuning`): the prefix runs without
            gradients, only the window's adapters and its exit head (`--exit_head`: copy = own trainable head, the
            reference; tied = the frozen LM head) train, nothing above the exit runs. Step time is the mean over
            the phases (equal-length phases: the mean tuning step); memory is the largest phase's.
  lora_all  LoRA on every layer, the whole forward and backward.
  full      every weight trains.

Per mode (each in its own process, so each peak RSS is its own): XLA's compiled memory analysis of the gradient
step (temporary, argument and output bytes), peak resident memory (ru_maxrss), seconds per step after `--warmup`
untimed steps. Writes `results/bench_edge_tuning/<timestamp>.json` with the CPU model and load average (a shared
machine moves these figures) and prints a table.
"""

from __future__ import annotations

import json
import os
import resource
import time

from absl import app
from absl import flags
import numpy as np

_MODES = flags.DEFINE_list("modes", ["adaptive", "lora_all", "full"], "Modes: adaptive, lora_all, full.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps (per phase for adaptive).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps first (compilation).")
_STRIDE = flags.DEFINE_integer("stride", 8, "Adaptive layer tuning window (layers).")
_EXIT_HEAD = flags.DEFINE_string("exit_head", "copy", "copy (the reference) or tied.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "LoRA rank.")
_TINY = flags.DEFINE_bool("tiny", False, "A small random model instead of SmolLM2-135M.")
_OUT = flags.DEFINE_string("out", "results/bench_edge_tuning", "Output folder.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: 'mode:out.json' measures one mode.")


def _model():
  import jax  # pylint: disable=g-import-not-at-top

  from lacax.model import llama  # pylint: disable=g-import-not-at-top
  from lacax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from lacax.weights.loader import load_model  # pylint: disable=g-import-not-at-top

  if _TINY.value:
    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=8, num_heads=4,
                      num_kv_heads=2, head_dim=32, tie_word_embeddings=True, name="random-tiny")
    return llama.init_params(cfg, jax.random.PRNGKey(0), std=0.05), cfg
  model = load_model()
  return model.params, model.cfg


def measure(mode: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from lacax import train  # pylint: disable=g-import-not-at-top
  from lacax.compress import tuning  # pylint: disable=g-import-not-at-top
  from lacax.model import llama, lora as lora_lib  # pylint: disable=g-import-not-at-top
  from lacax.train import losses, state as st  # pylint: disable=g-import-not-at-top

  params, cfg = _model()
  lcfg = lora_lib.LoraConfig(rank=_LORA_RANK.value, alpha=2.0 * _LORA_RANK.value, dropout=0.0,
                             targets=tuple(llama.LORA_TARGETS))
  tcfg = tuning.TuningConfig(stride=_STRIDE.value, exit_head=_EXIT_HEAD.value, lora=lcfg)
  B, T = _BATCH.value, _SEQ_LEN.value
  rng = np.random.RandomState(0)
  total = _WARMUP.value + _STEPS.value

  def batch(i):
    ids = np.random.RandomState(i).randint(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    return {"tokens": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]), "mask": jnp.ones((B, T)),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}

  del rng
  tree = tuning.init_tree(params, cfg, tcfg, jax.random.PRNGKey(0))
  if mode == "adaptive":
    cases = [(k, tuning.phase_labels(tree, cfg, tcfg, k), tuning.phase_loss_fn(cfg, tcfg, k), tree)
             for k in range(len(tuning.windows(cfg.num_layers, tcfg.stride)))]
  elif mode == "lora_all":
    p = {"params": params, "lora": tree["lora"]}
    labels = {"params": jax.tree.map(lambda _: False, params), "lora": jax.tree.map(lambda _: True, tree["lora"])}

    def loss_fn(tr, fr, b, r):
      q = st.combine(tr, fr)
      logits, _ = llama.forward(q["params"], b["tokens"], b["positions"], None, cfg,
                                options=lora_lib.options(lcfg, q["lora"], r))
      return losses.next_token_loss(logits, b["targets"], b["mask"])

    cases = [(None, labels, loss_fn, p)]
  elif mode == "full":
    cases = [(None, jax.tree.map(lambda _: True, params), losses.llama_loss_fn(cfg), params)]
  else:
    raise ValueError(f"--modes contains {mode!r}; expected adaptive, lora_all or full")
  del tree
  memory, step_s, trainable = [], [], []
  opt, schedule = train.make_optimizer(train.OptimizerConfig(learning_rate=1e-4, schedule="constant",
                                                             clip_norm=1.0), total)
  for phase, labels, loss_fn, p in cases:
    state = train.create_train_state(p, opt, labels=labels)
    trainer = train.Trainer(loss_fn, opt, train.TrainConfig(steps=total, progress=False), schedule=schedule,
                            labels=labels)
    state = trainer.place(state)
    b0 = batch(0)
    compiled = trainer._step_fn.jitted.lower(state.replace(frozen=None), state.frozen, b0).compile()  # pylint: disable=protected-access
    mem = compiled.memory_analysis()
    memory.append({"phase": phase, "temp_bytes": int(mem.temp_size_in_bytes),
                   "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes)})
    trainable.append(train.count_params(state.trainable))
    for i in range(_WARMUP.value):
      state, m = trainer.step(state, batch(i))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(_WARMUP.value, total):
      state, m = trainer.step(state, batch(i))
    jax.block_until_ready(state.trainable)
    step_s.append((time.perf_counter() - t0) / _STEPS.value)
    del state, trainer, compiled
  peak = max(memory, key=lambda x: x["temp_bytes"])
  return {"step_s": float(np.mean(step_s)), "step_s_per_phase": step_s, "compiled": memory,
          "compiled_temp_bytes": peak["temp_bytes"],
          "compiled_total_bytes": max(m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"] for m in memory),
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "trainable_params": max(trainable), "model": cfg.name}


def _run_case(mode: str) -> dict:
  from lacax import results as results_lib  # pylint: disable=g-import-not-at-top

  forwarded = [f"--{f.name}={f.value}" for f in (_BATCH, _SEQ_LEN, _STEPS, _WARMUP, _STRIDE, _EXIT_HEAD,
                                                  _LORA_RANK, _TINY)]
  return results_lib.measure_in_subprocess("experiments.bench_edge_tuning", mode, forwarded,
                                           prefix="lacax_bench_edge_")


def main(argv):
  del argv
  if _WORKER.value:
    mode, out = _WORKER.value.split(":", 1)
    with open(out, "w") as f:
      json.dump(measure(mode), f)
    return
  from lacax import results as results_lib  # pylint: disable=g-import-not-at-top

  load_before = os.getloadavg()
  cases = {mode: _run_case(mode) for mode in _MODES.value}
  ref = {k: cases.get(k, {}) for k in ("lora_all", "full")}
  ada = cases.get("adaptive", {})
  ratios = {}
  for name, base in ref.items():
    if "error" in ada or "error" in base or not ada or not base:
      continue
    ratios[f"vs_{name}"] = {
        "compiled_temp_ratio": base["compiled_temp_bytes"] / max(ada["compiled_temp_bytes"], 1),
        "compiled_total_ratio": base["compiled_total_bytes"] / max(ada["compiled_total_bytes"], 1),
        "peak_rss_ratio": base["peak_rss_bytes"] / max(ada["peak_rss_bytes"], 1),
        "speedup": base["step_s"] / max(ada["step_s"], 1e-9)}
  record = {"cases": cases, "ratios": ratios, "paper_claims": {"memory": 4.0, "speedup": 2.92},
            "settings": {f.name: f.value for f in (_BATCH, _SEQ_LEN, _STEPS, _WARMUP, _STRIDE, _EXIT_HEAD,
                                                   _LORA_RANK, _TINY)},
            "cpu_model": results_lib.cpu_model(), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), **results_lib.provenance()}
  path = results_lib.timestamped_path(_OUT.value)
  results_lib.write_json(path, record)
  print(f"{'mode':<10} {'step s':>8} {'temp MiB':>9} {'compiled MiB':>12} {'peak RSS MiB':>12} {'trainable':>11}")
  for mode, c in cases.items():
    if "error" in c:
      print(f"{mode:<10} error: {c['error'][-300:]}")
      continue
    print(f"{mode:<10} {c['step_s']:>8.3f} {c['compiled_temp_bytes'] / 2 ** 20:>9.1f} "
          f"{c['compiled_total_bytes'] / 2 ** 20:>12.1f} {c['peak_rss_bytes'] / 2 ** 20:>12.1f} "
          f"{c['trainable_params']:>11,}")
  for name, r in ratios.items():
    print(f"adaptive {name}: temp memory {r['compiled_temp_ratio']:.2f}x, compiled total "
          f"{r['compiled_total_ratio']:.2f}x, peak RSS {r['peak_rss_ratio']:.2f}x, speed {r['speedup']:.2f}x "
          "(paper: 4x memory, 2.92x speed)")
  print(f"CPU {record['cpu_model']}, load average {load_before} -> {record['load_average_after']}; {path}")


if __name__ == "__main__":
  app.run(main)
