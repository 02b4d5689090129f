"""Edge-LLM LUC on the real model: perplexity versus memory for a LUC policy, a searched policy and uniform
sparsity / bits at (about) equal modelled memory.

Calibration and evaluation tokens are disjoint windows of the embedded offline text
(`lacax.eval.texts.default_text`). For each policy: `lacax.compress.apply_policy` (packed storage), then
`lacax.compress.apply.measure_memory_point` (teacher-forced perplexity, resident parameter bytes, the byte
model's figure, the measured zero fraction). JSON under results/bench_compress/ and a table.

    python -m experiments.bench_compress                       # SmolLM2-135M, a few CPU minutes
    python -m experiments.bench_compress --sparsity=0.3 --bits=4,8 --method=wanda
"""

from __future__ import annotations

import os
import time

from absl import app, flags
import numpy as np

from lacax import results
from lacax.compress import apply, policy as policy_lib, sensitivity
from lacax.eval import texts
from lacax.weights.loader import load_model

flags.DEFINE_string("model", None, "model path (default: the embedded SmolLM2-135M-Instruct)")
flags.DEFINE_float("sparsity", 0.5, "target mean sparsity")
flags.DEFINE_list("bits", ["4", "8"], "weight bit widths measured and searched")
flags.DEFINE_list("ratios", ["0.25", "0.5", "0.75"], "pruning ratios measured")
flags.DEFINE_string("method", "sparsegpt", "pruning method")
flags.DEFINE_integer("group_size", 32, "quantization group (input features)")
flags.DEFINE_integer("calib_rows", 4, "calibration rows")
flags.DEFINE_integer("eval_rows", 4, "evaluation rows")
flags.DEFINE_integer("length", 256, "tokens per row")
flags.DEFINE_string("out", "results/bench_compress", "output directory")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.perf_counter()
  model = load_model(FLAGS.model)
  cfg, params = model.cfg, model.params
  ids = np.asarray(model.tokenizer.encode(texts.default_text()), np.int32)
  need = (FLAGS.calib_rows + FLAGS.eval_rows) * FLAGS.length
  if ids.size < need:
    raise ValueError(f"the embedded text has {ids.size} tokens; {need} needed (rows x length)")
  calib = ids[:FLAGS.calib_rows * FLAGS.length].reshape(FLAGS.calib_rows, FLAGS.length)
  evals = ids[FLAGS.calib_rows * FLAGS.length:need].reshape(FLAGS.eval_rows, FLAGS.length)
  bits = tuple(int(b) for b in FLAGS.bits)
  t0 = time.perf_counter()
  table = sensitivity.measure(params, cfg, calib, ratios=[float(r) for r in FLAGS.ratios], bits=bits,
                              method=FLAGS.method, group_size=FLAGS.group_size)
  sens_seconds = time.perf_counter() - t0
  common = dict(method=FLAGS.method, group_size=FLAGS.group_size, storage="packed")
  hi = max(bits)
  uniform = policy_lib.uniform_policy(cfg, FLAGS.sparsity, hi, **common)
  budget = policy_lib.policy_bytes(uniform, cfg)
  luc = policy_lib.luc_policy(table, cfg, FLAGS.sparsity, base_bits=hi, high_bits=None, **common)
  searched = policy_lib.search_policy(table, cfg, budget, **common)
  lo_uniform = policy_lib.uniform_policy(cfg, 0.0, min(bits), **common)
  rows = {"dense": apply.measure_memory_point(params, cfg, evals)}
  rows["dense"]["modelled_bytes"] = policy_lib.policy_bytes(
      policy_lib.CompressionPolicy(sparsity=(0.0,) * cfg.num_layers, w_bits=(None,) * cfg.num_layers), cfg)
  policies = {"uniform": uniform, "luc": luc, "searched": searched, f"uniform_{min(bits)}bit": lo_uniform}
  for name, pol in policies.items():
    t0 = time.perf_counter()
    compressed = apply.apply_policy(params, cfg, pol, calib)
    rows[name] = {**apply.measure_memory_point(compressed, cfg, evals, pol),
                  "apply_seconds": time.perf_counter() - t0, "sparsity": list(pol.sparsity),
                  "w_bits": list(pol.w_bits)}
  out = {"model": cfg.name, "cpu": results.cpu_model(), "settings": {k: FLAGS[k].value for k in (
      "sparsity", "bits", "ratios", "method", "group_size", "calib_rows", "eval_rows", "length")},
         "budget_bytes": budget, "sensitivity_seconds": sens_seconds, "rows": rows,
         "sensitivity": {"prune": table.prune.tolist(), "quant": table.quant.tolist()},
         "total_seconds": time.perf_counter() - start, **results.provenance()}
  path = results.timestamped_path(FLAGS.out)
  results.write_json(path, out)
  print(f"{'policy':14} {'ppl':>9} {'modelled MB':>12} {'resident MB':>12} {'layers MB':>10} {'zeros':>6} "
        f"{'mean s':>7} {'mean b':>7}")
  for name, r in rows.items():
    print(f"{name:14} {r['perplexity']:9.3f} {r['modelled_bytes'] / 1e6:12.2f} {r['resident_bytes'] / 1e6:12.2f} "
          f"{r['layer_resident_bytes'] / 1e6:10.2f} {r['zero_fraction']:6.3f} {r.get('mean_sparsity', 0):7.3f} "
          f"{r.get('mean_w_bits', 32):7.2f}")
  print("wrote", path)


if __name__ == "__main__":
  app.run(main)
