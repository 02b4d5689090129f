"""Decode speed of exported AmoebaLLM subnets vs the full model (same machine, same run).

  python -m experiments.bench_subnets --subnets=results/amoeba/<run>/subnets/*   [--context=128 --new_tokens=64]
  python -m experiments.bench_subnets --run_dir=results/amoeba/<run>

Each sliced subnet (`lacax.subnets.export`, loaded with `load_model`) and the full model it came from prefill
the same prompt and decode `new_tokens` tokens greedily with the full cache (compiled decode loop, compiled
before timing, best of `repeats`). Decoding a token multiplies every decoder weight and the LM head once, so
the proportional speed-up is (full model's decoder + LM head parameters) / (subnet's); the benchmark reports
the measured speed-up, that target, and measured / target (the goal: within 15%, i.e. >= 0.85).
Writes `results/bench_subnets/<timestamp>.json` (CPU model recorded) and prints a table.
"""

from __future__ import annotations

import datetime
import glob
import json
import os

from absl import app
from absl import flags
import jax
import numpy as np

from lacax import generate as generation
from lacax import results as results_lib
from lacax.cache.full import FullPolicy
from lacax.model import llama
from lacax.subnets import export
from lacax.weights.loader import load_model

_SUBNETS = flags.DEFINE_list("subnets", [], "Exported subnet directories (globs allowed).")
_RUN_DIR = flags.DEFINE_string("run_dir", "", "An amoeba job's run directory: benchmarks its subnets/*.")
_CONTEXT = flags.DEFINE_integer("context", 128, "Prompt length.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens decoded per measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is reported).")
_OUT = flags.DEFINE_string("out", "results/bench_subnets", "Output folder.")


def decode_params(params, cfg) -> int:
  """Weights one decode step multiplies: every decoder-layer parameter plus the LM head."""
  layers = sum(int(np.prod(x.shape)) for seg in llama.layer_segments(params) for x in jax.tree.leaves(seg))
  return layers + cfg.vocab_size * cfg.hidden_size


def bench(model, context: int, new_tokens: int, repeats: int) -> dict:
  prompt = [np.random.RandomState(context).randint(10, min(model.cfg.vocab_size, 30000), context).tolist()]
  kwargs = dict(max_new_tokens=new_tokens, policy=FullPolicy(), bucket=context)
  generation.generate(model.params, model.cfg, prompt, **kwargs)  # compile
  best = max(generation.generate(model.params, model.cfg, prompt, **kwargs).decode_tokens_per_second
             for _ in range(repeats))
  return {"decode_tokens_per_second": best, "decode_params": decode_params(model.params, model.cfg),
          "params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params)))}


def main(argv):
  del argv
  paths = []
  for pattern in _SUBNETS.value:
    paths.extend(sorted(glob.glob(pattern)))
  if _RUN_DIR.value:
    paths.extend(sorted(glob.glob(os.path.join(_RUN_DIR.value, "subnets", "*"))))
  paths = [p for p in paths if export.is_subnet_dir(p)]
  if not paths:
    raise app.UsageError("no exported subnet found: pass --subnets=<dirs> or --run_dir=<amoeba run>")
  sources = {json.load(open(os.path.join(p, export.SUBNET_FILE)))["source"] for p in paths}
  if len(sources) != 1:
    raise app.UsageError(f"the subnets come from different models {sorted(sources)}; benchmark one at a time")
  full = load_model(sources.pop() or None)
  rows = [{"model": full.cfg.name, "path": full.source, **bench(full, _CONTEXT.value, _NEW_TOKENS.value,
                                                                _REPEATS.value)}]
  for p in paths:
    sub = load_model(p)
    rows.append({"model": sub.cfg.name, "path": p, **bench(sub, _CONTEXT.value, _NEW_TOKENS.value, _REPEATS.value)})
  ref = rows[0]
  for r in rows:
    r["speedup"] = r["decode_tokens_per_second"] / ref["decode_tokens_per_second"]
    r["proportional_speedup"] = ref["decode_params"] / r["decode_params"]
    r["speedup_over_proportional"] = r["speedup"] / r["proportional_speedup"]
    r["within_15_percent"] = bool(r["speedup_over_proportional"] >= 0.85)
  out = {"rows": rows, "context": _CONTEXT.value, "new_tokens": _NEW_TOKENS.value, "cpu": results_lib.cpu_model(),
         "backend": jax.default_backend(), **results_lib.provenance()}
  os.makedirs(_OUT.value, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  path = os.path.join(_OUT.value, f"{stamp}.json")
  results_lib.write_json(path, out)
  print(f"decode, context {_CONTEXT.value}, {_NEW_TOKENS.value} new tokens, {out['cpu']}")
  print(f"{'model':<40} {'decode params':>14} {'tok/s':>8} {'speed-up':>9} {'proportional':>12} {'ratio':>6}")
  for r in rows:
    print(f"{r['model']:<40} {r['decode_params']:>14,} {r['decode_tokens_per_second']:>8.1f} {r['speedup']:>9.2f} "
          f"{r['proportional_speedup']:>12.2f} {r['speedup_over_proportional']:>6.2f}")
  print(f"written {path}")


if __name__ == "__main__":
  app.run(main)
