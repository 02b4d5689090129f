"""Training speed and memory: lacax vs PyTorch (+ peft for LoRA) on SmolLM2-135M, same batch, length and machine.

  python -m experiments.bench_train [--modes=lora,full] [--batch=4] [--seq_len=128] [--steps=4] [--warmup=2]

Both sides train the same weights (the embedded SmolLM2-135M-Instruct GGUF, dequantized to float32; transformers
reads the same file) on the same token batches with the same recipe: next-token cross-entropy, AdamW
(lr 1e-4, no weight decay), gradient clipping at 1.0; LoRA rank `--lora_rank`, alpha 2 x rank, dropout 0.05 on
`--lora_targets` (peft's q_proj / v_proj by default). Every measurement runs in its own process, one after the
other (so each peak RSS is its own and the runs do not compete for cores): `--warmup` steps (compilation for lacax),
then `--steps` timed steps. Reported per (framework, mode): training tokens/s (batch x seq_len tokens per step),
seconds per step, peak resident memory of the process (ru_maxrss) and, for lacax, the compiled step's temporary
buffer bytes (XLA's memory analysis). The lacax / PyTorch tokens/s ratio is the headline.

Precision: `--compute_dtype=bfloat16` trains lacax with bfloat16 products over float32 master weights and a
float32 residual stream (`lacax.train.lm`); PyTorch trains in float32, and `--frameworks=...,torch_autocast`
adds PyTorch with bfloat16 CPU autocast (its matmuls in bfloat16) as the like-for-like peer. Every measured
process starts with glibc's huge-page tunable (`--malloc_hugepages`, on for both frameworks; off gives the
default allocator).
Writes `results/bench_train/<timestamp>.json` and prints a table; records the CPU model and the load average,
since on a shared machine the figures move with the neighbours.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import resource
import time

from absl import app
from absl import flags
import numpy as np

_MODES = flags.DEFINE_list("modes", ["lora", "full"], "Fine-tuning modes to measure: lora, full.")
_FRAMEWORKS = flags.DEFINE_list("frameworks", ["lacax", "torch"], "Frameworks to measure: lacax, torch, and "
                                 "torch_autocast (torch with bfloat16 CPU autocast in the forward).")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "LoRA rank.")
_LORA_TARGETS = flags.DEFINE_list("lora_targets", ["q", "v"], "LoRA target projections.")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", "", "lacax compute dtype ('' = float32, or bfloat16).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads (0 = torch's default).")
_HUGEPAGES = flags.DEFINE_bool("malloc_hugepages", True, "Start every measured process (both frameworks) with glibc's "
                                "transparent-huge-page tunable (lacax.memory.HUGEPAGE_TUNABLE).")
_OUT = flags.DEFINE_string("out", "results/bench_train", "Output folder.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: 'framework:mode:out.json' measures one case.")

_TORCH_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                  "down": "down_proj"}
_LR = 1e-4


def _batches(vocab: int, n: int) -> list[np.ndarray]:
  """n batches of [batch, seq_len + 1] ids of the embedded text (the same for both frameworks)."""
  from lacax.eval import texts  # pylint: disable=g-import-not-at-top
  from lacax.weights.loader import default_model_path  # pylint: disable=g-import-not-at-top
  from lacax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  tok = load_tokenizer(default_model_path())
  need = n * _BATCH.value * (_SEQ_LEN.value + 1)
  ids = np.asarray(tok.encode(texts.default_text()[:need * 8]), np.int32)
  if len(ids) < need:
    ids = np.tile(ids, need // len(ids) + 1)
  ids = ids[:need] % vocab
  return list(ids.reshape(n, _BATCH.value, _SEQ_LEN.value + 1))


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_lacax(mode: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from lacax import memory  # pylint: disable=g-import-not-at-top
  from lacax import train  # pylint: disable=g-import-not-at-top
  from lacax.train import lm  # pylint: disable=g-import-not-at-top
  from lacax.weights.loader import load_model  # pylint: disable=g-import-not-at-top

  model = load_model()
  if mode == "full":
    setup = lm.full_setup(model, compute_dtype=_COMPUTE_DTYPE.value)
  else:
    setup = lm.lora_setup(model, rank=_LORA_RANK.value, alpha=2.0 * _LORA_RANK.value, dropout=0.05,
                          targets=tuple(_LORA_TARGETS.value), compute_dtype=_COMPUTE_DTYPE.value)
  total = _WARMUP.value + _STEPS.value
  opt, schedule = train.make_optimizer(train.OptimizerConfig(learning_rate=_LR, schedule="constant",
                                                             clip_norm=1.0), total)
  state = train.create_train_state(setup.params, opt, labels=setup.labels)
  # The state holds its own copy of the trained weights: drop the loader's (a full fine-tune's peak RSS would
  # otherwise count the model twice).
  setup = dataclasses.replace(setup, params=None)
  del model
  trainer = train.Trainer(setup.loss_fn, opt, train.TrainConfig(steps=total, compute_dtype=_COMPUTE_DTYPE.value,
                                                                progress=False),
                          schedule=schedule, labels=setup.labels)
  state = trainer.place(state)
  T = _SEQ_LEN.value
  ids = _batches(setup.cfg.vocab_size, total)
  batches = [{"tokens": jnp.asarray(b[:, :-1]), "targets": jnp.asarray(b[:, 1:]),
              "mask": jnp.ones((_BATCH.value, T), jnp.float32),
              "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (_BATCH.value, T))} for b in ids]
  compiled = trainer._step_fn.jitted.lower(state.replace(frozen=None), state.frozen, batches[0]).compile()  # pylint: disable=protected-access
  analysis = compiled.memory_analysis()
  temp_bytes = int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else None
  losses_ = []
  t_compile = time.perf_counter()
  for b in batches[:_WARMUP.value]:
    state, m = trainer.step(state, b)
  jax.block_until_ready(m)
  warm_s = time.perf_counter() - t_compile
  t0 = time.perf_counter()
  for b in batches[_WARMUP.value:]:
    state, m = trainer.step(state, b)
    losses_.append(m["loss"])
  jax.block_until_ready(state.trainable)
  elapsed = time.perf_counter() - t0
  return {"step_s": elapsed / _STEPS.value, "tokens_per_s": _STEPS.value * _BATCH.value * T / elapsed,
          "warmup_s": warm_s, "peak_rss_bytes": _peak_rss_bytes(), "compiled_temp_bytes": temp_bytes,
          "trainable_params": train.count_params(state.trainable), "losses": [float(x) for x in losses_],
          "malloc_hugepages": memory.malloc_hugepages()}


def measure_torch(mode: str, autocast: bool = False) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from lacax import memory  # pylint: disable=g-import-not-at-top
  from lacax.weights.loader import default_model_path  # pylint: disable=g-import-not-at-top

  if _TORCH_THREADS.value:
    torch.set_num_threads(_TORCH_THREADS.value)
  path = default_model_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                            torch_dtype=torch.float32)
  if mode == "lora":
    import peft  # pylint: disable=g-import-not-at-top

    lcfg = peft.LoraConfig(r=_LORA_RANK.value, lora_alpha=2 * _LORA_RANK.value, lora_dropout=0.05,
                           target_modules=[_TORCH_TARGETS[t] for t in _LORA_TARGETS.value], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=_LR, weight_decay=0.0)
  total = _WARMUP.value + _STEPS.value
  batches = [torch.tensor(b, dtype=torch.long) for b in _batches(model.config.vocab_size, total)]
  loss_fn = torch.nn.CrossEntropyLoss()

  def step(b):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      logits = model(input_ids=b[:, :-1]).logits
    loss = loss_fn(logits.reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  t = time.perf_counter()
  for b in batches[:_WARMUP.value]:
    step(b)
  warm_s = time.perf_counter() - t
  t0 = time.perf_counter()
  losses_ = [step(b) for b in batches[_WARMUP.value:]]
  elapsed = time.perf_counter() - t0
  return {"step_s": elapsed / _STEPS.value, "tokens_per_s": _STEPS.value * _BATCH.value * _SEQ_LEN.value / elapsed,
          "warmup_s": warm_s, "peak_rss_bytes": _peak_rss_bytes(), "compiled_temp_bytes": None,
          "trainable_params": int(sum(p.numel() for p in params)), "losses": losses_,
          "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
          "malloc_hugepages": memory.malloc_hugepages()}


def _worker(spec: str) -> None:
  framework, mode, out = spec.split(":", 2)
  result = measure_lacax(mode) if framework == "lacax" else measure_torch(mode, framework == "torch_autocast")
  with open(out, "w") as f:
    json.dump(result, f)


def _run_case(framework: str, mode: str) -> dict:
  from lacax import memory  # pylint: disable=g-import-not-at-top
  from lacax import results as results_lib  # pylint: disable=g-import-not-at-top

  forwarded = [f"--{f.name}={f.value}" for f in (_BATCH, _SEQ_LEN, _STEPS, _WARMUP, _LORA_RANK, _COMPUTE_DTYPE,
                                                  _TORCH_THREADS)]
  forwarded.append(f"--lora_targets={','.join(_LORA_TARGETS.value)}")
  env = memory.hugepage_env() if _HUGEPAGES.value else None
  return results_lib.measure_in_subprocess("experiments.bench_train", f"{framework}:{mode}", forwarded,
                                           prefix="lacax_bench_train_", env=env)


def main(argv):
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  for name, values, known in (("frameworks", _FRAMEWORKS.value, ("lacax", "torch", "torch_autocast")),
                              ("modes", _MODES.value, ("lora", "full"))):
    unknown = [v for v in values if v not in known]
    if unknown:
      raise app.UsageError(f"--{name}={','.join(values)}: {unknown} unknown; expected some of {list(known)}")
  import jax  # pylint: disable=g-import-not-at-top

  from lacax import results as results_lib  # pylint: disable=g-import-not-at-top

  load_before = os.getloadavg()
  cases = {}
  for mode in _MODES.value:
    for framework in _FRAMEWORKS.value:
      print(f"measuring {framework} {mode} ...", flush=True)
      cases[f"{framework}:{mode}"] = _run_case(framework, mode)
  rows = []
  for mode in _MODES.value:
    lx, pt = cases.get(f"lacax:{mode}", {}), cases.get(f"torch:{mode}", {})
    ac = cases.get(f"torch_autocast:{mode}", {})
    ratio = (lx["tokens_per_s"] / pt["tokens_per_s"]) if "tokens_per_s" in lx and "tokens_per_s" in pt else None
    ratio_ac = (lx["tokens_per_s"] / ac["tokens_per_s"]) if "tokens_per_s" in lx and "tokens_per_s" in ac else None
    rows.append({"mode": mode, "lacax_tokens_per_s": lx.get("tokens_per_s"), "torch_tokens_per_s": pt.get("tokens_per_s"),
                 "speedup": ratio, "torch_autocast_tokens_per_s": ac.get("tokens_per_s"),
                 "speedup_vs_autocast": ratio_ac, "lacax_peak_rss_gib": lx.get("peak_rss_bytes", 0) / 2 ** 30 or None,
                 "torch_peak_rss_gib": pt.get("peak_rss_bytes", 0) / 2 ** 30 or None,
                 "lacax_compiled_temp_gib": (lx.get("compiled_temp_bytes") or 0) / 2 ** 30 or None})
  report = {
      "benchmark": "bench_train", "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "cpu_model": results_lib.cpu_model(), "cpu_count": os.cpu_count(), "load_average_before": load_before,
      "load_average_after": os.getloadavg(), "shared_machine_note": "measured on a machine shared with other jobs",
      "batch": _BATCH.value, "seq_len": _SEQ_LEN.value, "steps": _STEPS.value, "warmup": _WARMUP.value,
      "malloc_hugepages": _HUGEPAGES.value, "lora_rank": _LORA_RANK.value, "lora_targets": _LORA_TARGETS.value, "compute_dtype": _COMPUTE_DTYPE.value or "float32",
      "jax_version": jax.__version__, "git_commit": results_lib.git_commit(), "cases": cases, "rows": rows,
  }
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S") + ".json")
  results_lib.write_json(path, report)
  print(f"\nSmolLM2-135M training, batch {_BATCH.value} x {_SEQ_LEN.value} tokens, {_STEPS.value} timed steps; "
        f"{report['cpu_model']} ({os.cpu_count()} cores, load {load_before[0]:.1f} before)")
  print(f"{'mode':<6}{'lacax tok/s':>13}{'torch tok/s':>13}{'speedup':>9}{'autocast tok/s':>16}{'vs autocast':>13}"
        f"{'lacax RSS':>11}{'torch RSS':>11}{'lacax temp':>12}")
  def fmt(v, width, unit=""):  # a column of `width` characters; "-" where a framework was not measured
    return f"{v:.2f}{unit}".rjust(width) if v is not None else "-".rjust(width)

  for r in rows:
    print(f"{r['mode']:<6}{fmt(r['lacax_tokens_per_s'], 13)}{fmt(r['torch_tokens_per_s'], 13)}"
          f"{fmt(r['speedup'], 9, 'x')}{fmt(r['torch_autocast_tokens_per_s'], 16)}"
          f"{fmt(r['speedup_vs_autocast'], 13, 'x')}{fmt(r['lacax_peak_rss_gib'], 11, 'Gi')}{fmt(r['torch_peak_rss_gib'], 11, 'Gi')}"
          f"{fmt(r['lacax_compiled_temp_gib'], 12, 'Gi')}")
  for name, case in cases.items():
    if "error" in case:
      print(f"{name} failed:\n{case['error']}")
  print(f"written to {path}")


if __name__ == "__main__":
  app.run(main)
