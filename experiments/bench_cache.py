"""Decode speed and resident KV memory of cache policies after long streams.

  python -m experiments.bench_cache [--streamed=1024,8192,32768] [--cache_size=256] [--steps=16]

For each policy (full, StreamingLLM, LaCache at the same budget) and each stream length N, the cache is put in
the exact state it has after N tokens were streamed, and `--steps` further tokens are decoded with the
policy's compaction after every step (the compiled streaming loop of the main job). Reported: decode tokens/s,
resident KV bytes (every array of the cache pytree), and the share of a step spent compacting (the compiled
compaction alone, timed on the same cache).

The state after N tokens is built without running the model N times (hours on a CPU for N = 32k): the
positions each slot holds and the planner state come from running the policy's own plan on a position-only
cache (`lacax.cache.ladder.simulate_ladder` for LaCache; sinks + window for StreamingLLM; everything for the
full cache), and keys/values are random. Decode cost does not depend on the values, only on shapes and on
which slots are occupied, so the timings are those of a real stream.

Writes `results/bench_cache/<timestamp>.json` and prints a table.
"""

from __future__ import annotations

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lacax import results as results_lib
from lacax.cache import ladder as ladder_lib
from lacax.cache.kv_cache import KVCache
from lacax.cache.ladder import LadderPolicy
from lacax.cache.streaming import StreamingPolicy
from lacax.cache.base import CachePolicy
from lacax.cache.full import FullPolicy
from lacax.eval import perplexity
from lacax.weights.loader import load_model

_STREAMED = flags.DEFINE_list("streamed", ["1024", "8192", "32768"], "Stream lengths N.")
_CACHE_SIZE = flags.DEFINE_integer("cache_size", 256, "Budget of the compacting policies.")
_SPAN = flags.DEFINE_integer("span", 16, "LaCache span.")
_OVERLAP = flags.DEFINE_integer("overlap", 0, "LaCache overlap.")
_STEPS = flags.DEFINE_integer("steps", 16, "Decode steps timed per measurement.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Model dtype.")
_MODEL = flags.DEFINE_string("model", "", "Model path (default: the embedded SmolLM2-135M-Instruct).")
_POLICIES = flags.DEFINE_list("policies", ["full", "streaming", "lacache"], "Policies to measure.")
_OUT = flags.DEFINE_string("out", "results/bench_cache", "Output folder.")


def positions_after(policy: CachePolicy, num_layers: int, streamed: int) -> tuple[np.ndarray, object]:
  """[L, length] original positions each layer holds after `streamed` tokens, and the policy state."""
  if isinstance(policy, FullPolicy):
    return np.broadcast_to(np.arange(streamed), (num_layers, streamed)), None
  if isinstance(policy, StreamingPolicy):
    keep = np.arange(streamed)
    if streamed > policy.budget:
      keep = np.concatenate([keep[:policy.start_size], keep[streamed - policy.recent_size:]])
    return np.broadcast_to(keep, (num_layers, keep.size)), None
  if isinstance(policy, LadderPolicy):
    ladder = policy.ladder(num_layers)
    trace = ladder_lib.simulate_ladder(ladder, streamed, (streamed,))
    state = jax.tree.map(lambda x: jnp.asarray(x[-1])[None], trace.states)  # one row
    return trace.kept[streamed], state
  raise ValueError(f"no stream-state builder for policy {policy!r}")


def cache_after(policy: CachePolicy, cfg, streamed: int, extra: int, key) -> KVCache:
  """A batch-1 cache in the state it has after `streamed` tokens, with room for `extra` more."""
  kept, state = positions_after(policy, cfg.num_layers, streamed)
  capacity = policy.decode_capacity(cfg, streamed + extra)
  cache = policy.init(cfg, 1, capacity)
  length = kept.shape[1]
  pos = np.full((cfg.num_layers, 1, capacity, cfg.num_kv_heads), -1, np.int32)
  pos[:, 0, :length, :] = kept[..., None]
  k1, k2 = jax.random.split(key)
  shape = cache.k.shape
  valid = jnp.asarray(pos >= 0)[..., None]
  k = jnp.where(valid, jax.random.normal(k1, shape, cache.k.dtype), 0)
  v = jnp.where(valid, jax.random.normal(k2, shape, cache.v.dtype), 0)
  cache = cache.replace(k=k, v=v, pos=jnp.asarray(pos), length=jnp.full((cfg.num_layers, 1), length, jnp.int32))
  if state is not None:
    cache = cache.replace(state=state)
  return cache


@functools.partial(jax.jit, static_argnames=("policy", "steps"), donate_argnames=("cache",))
def _compact_loop(cache: KVCache, *, policy: CachePolicy, steps: int) -> KVCache:
  # Each iteration pretends one token was appended (length + 1) and compacts, as after a decode step.
  def body(_, c):
    return policy.compact(c.replace(length=jnp.minimum(c.length + 1, c.capacity)))

  return jax.lax.fori_loop(0, steps, body, cache)


def measure(model, policy: CachePolicy, streamed: int, steps: int) -> dict:
  cfg = model.cfg
  cache = cache_after(policy, cfg, streamed, steps + 1, jax.random.PRNGKey(streamed))
  resident = cache.nbytes()
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, steps)).astype(np.int32)
  positions = (streamed + np.arange(steps, dtype=np.int32))[None]
  compiled = perplexity.stream_chunk.lower(model.params, cache, tokens, tokens, positions, cfg=cfg,
                                           policy=policy).compile()
  warm = cache_after(policy, cfg, streamed, steps + 1, jax.random.PRNGKey(streamed))
  jax.block_until_ready(compiled(model.params, warm, tokens, tokens, positions))
  start = time.perf_counter()
  out_cache, nll = compiled(model.params, cache, tokens, tokens, positions)
  jax.block_until_ready(nll)
  seconds = time.perf_counter() - start

  compact_seconds = 0.0
  if not isinstance(policy, FullPolicy):
    loop = _compact_loop.lower(out_cache, policy=policy, steps=steps).compile()
    jax.block_until_ready(loop(cache_after(policy, cfg, streamed, steps + 1, jax.random.PRNGKey(1))))
    probe = cache_after(policy, cfg, streamed, steps + 1, jax.random.PRNGKey(2))
    start = time.perf_counter()
    jax.block_until_ready(loop(probe))
    compact_seconds = time.perf_counter() - start
  return {"policy": policy.name, "streamed": streamed, "cache_slots": cache.capacity,
          "resident_kv_bytes": resident, "decode_tokens_per_second": steps / seconds,
          "step_ms": 1e3 * seconds / steps, "compaction_ms_per_step": 1e3 * compact_seconds / steps,
          "compaction_share": compact_seconds / seconds}


def main(argv):
  del argv
  model = load_model(_MODEL.value or None, dtype=_DTYPE.value)
  size = _CACHE_SIZE.value
  policies = {"full": FullPolicy(), "streaming": StreamingPolicy(4, size - 4),
              "lacache": LadderPolicy(span=_SPAN.value, overlap=_OVERLAP.value, cache_size=size)}
  runs = []
  for name in _POLICIES.value:
    for streamed in (int(n) for n in _STREAMED.value):
      run = dict(measure(model, policies[name], streamed, _STEPS.value), policy=name)
      runs.append(run)
      print(f"{name} N={streamed}: {run['decode_tokens_per_second']:.2f} tok/s, "
            f"{run['resident_kv_bytes'] / 2**20:.1f} MiB KV, compaction {100 * run['compaction_share']:.1f}%",
            flush=True)
  by = {(r["policy"], r["streamed"]): r for r in runs}
  summary = {}
  streamed = [int(n) for n in _STREAMED.value]
  if ("lacache", streamed[0]) in by and ("lacache", streamed[-1]) in by:
    summary["lacache_speed_last_over_first"] = (by["lacache", streamed[-1]]["decode_tokens_per_second"] /
                                                by["lacache", streamed[0]]["decode_tokens_per_second"])
  if ("lacache", streamed[-1]) in by and ("full", streamed[-1]) in by:
    summary["lacache_over_full_at_longest"] = (by["lacache", streamed[-1]]["decode_tokens_per_second"] /
                                               by["full", streamed[-1]]["decode_tokens_per_second"])
  print(f"\n{'policy':<11}{'streamed':>9}{'slots':>8}{'KV MiB':>9}{'tok/s':>9}{'ms/step':>9}{'compact %':>11}")
  for r in runs:
    print(f"{r['policy']:<11}{r['streamed']:>9}{r['cache_slots']:>8}{r['resident_kv_bytes'] / 2**20:>9.1f}"
          f"{r['decode_tokens_per_second']:>9.2f}{r['step_ms']:>9.1f}{100 * r['compaction_share']:>11.1f}")
  for k, v in summary.items():
    print(f"{k}: {v:.2f}")
  record = {"provenance": results_lib.provenance(model.fingerprint()), "model": model.cfg.name,
            "dtype": _DTYPE.value, "cache_size": size, "span": _SPAN.value, "overlap": _OVERLAP.value,
            "steps": _STEPS.value, "runs": runs, "summary": summary}
  path = results_lib.timestamped_path(_OUT.value)
  results_lib.write_json(path, record)
  print(f"written: {path}")


if __name__ == "__main__":
  app.run(main)
