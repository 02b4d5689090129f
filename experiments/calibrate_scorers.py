"""Calibrates the offline statistics of the Q-Filter and ExpectedAttention cache policies on a lacax model.

  python -m experiments.calibrate_scorers [--model=PATH] [--samples=16] [--tokens=256] [--out=results/calibration]

kvpress downloads these from the Hugging Face hub (`nthngdy/<model>_qfilt`, `alessiodevoto/exp_att_stats_*`);
lacax computes them: the calibration text (default: the embedded English prose of `lacax.eval.texts`, or
--text=PATH) is cut into `--samples` consecutive pieces of `--tokens` tokens, and every layer's queries on them
give the Q-Filters (`lacax.cache.qfilter.calibrate`) and the pre-RoPE query mean / covariance
(`lacax.cache.expected_attention.calibrate`, each piece without its first n_sink tokens, as kvpress's
`collect_queries`). Writes `<out>/<model name>/qfilters.npz` and `expected_attention_stats.npz`, prints the
config overrides that use them, and a JSON record (timing, shapes, how concentrated the query directions are).
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from lacax import results as results_lib
from lacax.cache import expected_attention, plans, qfilter
from lacax.eval import texts
from lacax.model import rope as rope_lib
from lacax.weights.loader import load_model

_MODEL = flags.DEFINE_string("model", "", "Model path (default: the embedded SmolLM2-135M-Instruct).")
_TEXT = flags.DEFINE_string("text", "", "Calibration text (lacax.eval.texts.load_text; default: embedded prose).")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Calibration pieces.")
_TOKENS = flags.DEFINE_integer("tokens", 256, "Tokens per piece.")
_BATCH = flags.DEFINE_integer("batch", 4, "Pieces per forward.")
_N_SINK = flags.DEFINE_integer("n_sink", 4, "Leading tokens of each piece left out of the query statistics.")
_OUT = flags.DEFINE_string("out", "results/calibration", "Output folder.")


def main(argv):
  del argv
  model = load_model(_MODEL.value or None)
  ids = model.tokenizer.encode(texts.load_text(_TEXT.value, option="text"))
  need = _SAMPLES.value * _TOKENS.value
  if len(ids) < need:
    raise ValueError(f"--samples={_SAMPLES.value} x --tokens={_TOKENS.value} needs {need} tokens; the text has "
                     f"{len(ids)}")
  pieces = [ids[i * _TOKENS.value:(i + 1) * _TOKENS.value] for i in range(_SAMPLES.value)]
  start = time.perf_counter()
  # One forward per batch: pre-RoPE queries [L, pieces * tokens, H, hd]; Q-Filters need them rotated at their
  # positions in the piece, the statistics need each piece without its first n_sink tokens.
  plain = np.concatenate([plans.calibration_queries(model.params, model.cfg, pieces[b:b + _BATCH.value],
                                                    rotated=False, bucket=_TOKENS.value)
                          for b in range(0, len(pieces), _BATCH.value)], axis=1)
  positions = np.tile(np.arange(_TOKENS.value), len(pieces))
  rotated = np.asarray(rope_lib.apply_rope(jnp.asarray(plain), jnp.asarray(positions)[None, :, None],
                                           rope_lib.inv_frequencies(model.cfg)))
  plain = plain[:, (positions >= _N_SINK.value)]
  filters = qfilter.filters_from_queries(rotated, model.cfg.num_kv_heads)
  mean, cov = expected_attention.statistics_from_queries(plain)
  seconds = time.perf_counter() - start
  # How much of each group's query energy the Q-Filter direction carries (the paper's premise: most).
  group = model.cfg.num_heads // model.cfg.num_kv_heads
  shares = []
  for layer in range(model.cfg.num_layers):
    for head in range(model.cfg.num_kv_heads):
      q = rotated[layer, :, head * group:(head + 1) * group].reshape(-1, rotated.shape[-1]).astype(np.float64)
      shares.append(float(np.mean((q @ -filters[layer, head]) ** 2) / np.mean(np.sum(q**2, -1))))
  folder = os.path.join(_OUT.value, model.cfg.name or "model")
  os.makedirs(folder, exist_ok=True)
  qpath, epath = os.path.join(folder, "qfilters.npz"), os.path.join(folder, "expected_attention_stats.npz")
  qfilter.save(qpath, filters)
  expected_attention.save(epath, mean, cov, n_sink=_N_SINK.value)
  record = {"provenance": results_lib.provenance(model.fingerprint()), "cpu": results_lib.cpu_model(),
            "model": model.cfg.name, "samples": _SAMPLES.value, "tokens_per_sample": _TOKENS.value,
            "n_sink": _N_SINK.value, "seconds": seconds, "qfilters": qpath, "qfilters_shape": list(filters.shape),
            "expected_attention_stats": epath, "mean_shape": list(mean.shape),
            "qfilter_energy_share": {"mean": float(np.mean(shares)), "min": float(np.min(shares)),
                                     "max": float(np.max(shares))}}
  path = results_lib.timestamped_path(os.path.join(_OUT.value, "records"))
  results_lib.write_json(path, record)
  print(f"calibrated on {rotated.shape[1]} tokens in {seconds:.1f}s; Q-Filter direction carries "
        f"{100 * np.mean(shares):.1f}% of the query energy (min {100 * np.min(shares):.1f}%)")
  print(f"  --config.cache.qfilter_path={qpath}\n  --config.cache.expected_attention_stats={epath}")
  print(f"written: {path}")


if __name__ == "__main__":
  app.run(main)
