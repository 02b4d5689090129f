"""Cost of the kvpress scorer policies' prefill hand-off: score every prompt token and keep the top budget.

  python -m experiments.bench_scorers [--prompt=1024,4096] [--budget=0.25] [--policies=knorm,...]

For each policy and prompt length P, a cache shaped like the model's (default: the embedded SmolLM2-135M,
30 layers x 3 KV heads x 64) holds P random pre-RoPE keys/values, and the compiled hand-off
`policy.compact(cache, capacity=int(budget * P))` is timed (median of --repeats after one warm-up call); the
prefill forward itself is the same for every policy and is not included. The score depends on the values only
through their arithmetic, not their cost, so random keys time a real prompt. Q-Filter and ExpectedAttention
read statistics files (--qfilter_path / --stats_path, as written by experiments.calibrate_scorers); without
them random ones of the model's shape are used (same cost).

Writes `results/bench_scorers/<timestamp>.json` and prints a table.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lacax import results as results_lib
from lacax.cache import expected_attention, qfilter, registry
from lacax.weights.loader import load_model

_SCORERS = ("knorm", "random", "keydiff", "lagkv", "cur", "leverage", "qfilter", "expectedattention")
_PROMPT = flags.DEFINE_list("prompt", ["1024", "4096"], "Prompt lengths P.")
_BUDGET = flags.DEFINE_float("budget", 0.25, "Fraction of the prompt kept.")
_POLICIES = flags.DEFINE_list("policies", list(_SCORERS) + ["snapkv"], "Policies (registry names).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")
_MODEL = flags.DEFINE_string("model", "", "Model path (default: the embedded SmolLM2-135M-Instruct).")
_QFILTER = flags.DEFINE_string("qfilter_path", "", "Q-Filter file (default: random filters).")
_STATS = flags.DEFINE_string("stats_path", "", "ExpectedAttention statistics (default: random ones).")
_OUT = flags.DEFINE_string("out", "results/bench_scorers", "Output folder.")


def filled(policy, cfg, prompt: int):
  cache = policy.init(cfg, 1, prompt)
  rng = np.random.RandomState(0)
  shape = cache.k.shape
  pos = np.broadcast_to(np.arange(prompt, dtype=np.int32)[None, None, :, None], cache.pos.shape)
  cache = cache.replace(k=jnp.asarray(rng.randn(*shape), cache.k.dtype), v=jnp.asarray(rng.randn(*shape), cache.v.dtype),
                        pos=jnp.asarray(pos), length=jnp.full(cache.length.shape, prompt, jnp.int32))
  if cache.scores is not None:  # SnapKV: window attention as recorded by the prefill
    cache = cache.replace(scores=jnp.asarray(rng.rand(*cache.scores.shape), jnp.float32))
  return cache


def main(argv):
  del argv
  cfg = load_model(_MODEL.value or None).cfg
  tmp = tempfile.mkdtemp(prefix="bench_scorers_")
  qpath, spath = _QFILTER.value, _STATS.value
  rng = np.random.RandomState(0)
  if not qpath:
    qpath = os.path.join(tmp, "q.npz")
    qfilter.save(qpath, rng.randn(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim))
  if not spath:
    spath = os.path.join(tmp, "s.npz")
    f = rng.randn(cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim) / np.sqrt(cfg.head_dim)
    expected_attention.save(spath, rng.randn(cfg.num_layers, cfg.num_heads, cfg.head_dim), f @ np.swapaxes(f, -1, -2))
  runs = []
  for prompt in (int(p) for p in _PROMPT.value):
    budget = max(1, int(_BUDGET.value * prompt))
    for name in _POLICIES.value:
      section = {**registry.cache_defaults(), "size": budget, "qfilter_path": qpath,
                 "expected_attention_stats": spath}
      policy = registry.make_policy(name, section)
      capacity = policy.decode_capacity(cfg, budget) if name == "snapkv" else budget
      cache = filled(policy, cfg, prompt)
      step = jax.jit(lambda c, p=policy, cap=capacity: p.compact(c, capacity=cap))
      t0 = time.perf_counter()
      jax.block_until_ready(step(cache))
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(step(cache))
        times.append(time.perf_counter() - t0)
      run = {"policy": name, "prompt": prompt, "budget": budget, "handoff_ms": 1e3 * float(np.median(times)),
             "first_call_s": compile_s}
      runs.append(run)
      print(f"{name} P={prompt}: {run['handoff_ms']:.1f} ms (first call {compile_s:.1f}s)", flush=True)
  print(f"\n{'policy':<20}{'prompt':>8}{'budget':>8}{'hand-off ms':>13}")
  for r in runs:
    print(f"{r['policy']:<20}{r['prompt']:>8}{r['budget']:>8}{r['handoff_ms']:>13.1f}")
  record = {"provenance": results_lib.provenance(), "cpu": results_lib.cpu_model(), "model": cfg.name,
            "layers": cfg.num_layers, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "repeats": _REPEATS.value, "runs": runs,
            "note": "timed on a shared, loaded 2-core machine unless stated otherwise"}
  path = results_lib.timestamped_path(_OUT.value)
  results_lib.write_json(path, record)
  print(f"written: {path}")


if __name__ == "__main__":
  app.run(main)
