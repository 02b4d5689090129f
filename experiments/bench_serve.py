"""Throughput of `lacax serve` against `lacax.generate` on the same batch, model and machine.

  python -m experiments.bench_serve [--concurrency=1,4,16] [--new_tokens=32] [--repeats=3] [--model=PATH]

For each concurrency c: c short raw prompts are (a) generated directly as one batch by
`lacax.generate.generate` (greedy, stopping at the tokenizer's stop ids), and (b) sent as c concurrent
`/v1/completions` requests (greedy, the same max_tokens) to an in-process `lacax serve` on 127.0.0.1, whose
scheduler batches them. Both are compiled once before timing (a warm-up round of the same shape); the best of
`--repeats` rounds is reported. Figures: requests/s and generated tokens/s of each path, and the server's
overhead, 1 - server tokens/s / direct tokens/s (HTTP, JSON, the gathering window, the host checks every
`--chunk` decode steps, per-row sampling keys and batch padding).
Writes `results/bench_serve/<timestamp>.json` (with the CPU model) and prints a table.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time

from absl import app
from absl import flags
import httpx

from lacax import generate as generation
from lacax import results as results_lib
from lacax.hw.backends.local import LocalBackend
from lacax.serve import Service

_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "4", "16"], "Concurrent requests (= direct batch size).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "max_tokens of every request.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per path (the best is reported).")
_CHUNK = flags.DEFINE_integer("chunk", 8, "The server's decode steps between host checks.")
_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 50.0, "The server's gathering window.")
_MODEL = flags.DEFINE_string("model", "", "Model path (default: the embedded SmolLM2-135M-Instruct GGUF).")
_OUT = flags.DEFINE_string("out", "results/bench_serve", "Output folder.")

PROMPTS = [
    "Write a Verilog module for a 4-bit counter.", "What is a KV cache?", "Explain a D flip-flop.",
    "List three uses of a multiplexer.", "What does a synthesis tool do?", "Define setup time.",
    "Describe a finite state machine.", "Why pipeline a processor?", "What is clock gating?",
    "Name two hardware description languages.", "What is a testbench?", "Explain one-hot encoding.",
    "What is a carry-lookahead adder?", "Describe a FIFO buffer.", "What is metastability?",
    "Explain the difference between blocking and non-blocking assignments.",
]


def bench_direct(backend: LocalBackend, prompts: list[list[int]], new_tokens: int) -> dict:
  model = backend.model
  start = time.perf_counter()
  result = generation.generate(model.params, model.cfg, prompts, max_new_tokens=new_tokens,
                               stop_ids=backend.tokenizer.stop_ids, policy=backend.policy)
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "generated_tokens": result.generated_tokens, "requests": len(prompts)}


async def _ask_all(base_url: str, model_name: str, prompts: list[str], new_tokens: int) -> dict:
  async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
    async def one(prompt):
      reply = await client.post("/completions", json={"model": model_name, "prompt": prompt,
                                                       "max_tokens": new_tokens, "temperature": 0})
      reply.raise_for_status()
      return reply.json()

    start = time.perf_counter()
    replies = await asyncio.gather(*(one(p) for p in prompts))
    seconds = time.perf_counter() - start
  return {"seconds": seconds, "generated_tokens": sum(r["usage"]["completion_tokens"] for r in replies),
          "requests": len(prompts)}


def _rates(run: dict) -> dict:
  return {**run, "requests_per_second": run["requests"] / run["seconds"],
          "tokens_per_second": run["generated_tokens"] / run["seconds"]}


def main(argv):
  del argv
  backend = LocalBackend.load(_MODEL.value or None, chunk=_CHUNK.value)
  tok = backend.tokenizer
  name = "bench"
  record = {"provenance": results_lib.provenance(backend.model.fingerprint()), "cpu_model": results_lib.cpu_model(),
            "cpu_count": os.cpu_count(), "model": backend.describe(), "new_tokens": _NEW_TOKENS.value,
            "chunk": _CHUNK.value, "batch_window_ms": _WINDOW_MS.value, "runs": []}
  concurrencies = [int(c) for c in _CONCURRENCY.value]
  with Service(backend, model_name=name, batch_window_s=_WINDOW_MS.value / 1000.0,
               max_batch=max(concurrencies)) as service:
    for c in concurrencies:
      texts = [PROMPTS[i % len(PROMPTS)] for i in range(c)]
      ids = [tok.encode(t) for t in texts]
      # Warm-up (compilation) of both paths at this shape, then interleaved timed rounds.
      bench_direct(backend, ids, _NEW_TOKENS.value)
      asyncio.run(_ask_all(service.base_url, name, texts, _NEW_TOKENS.value))
      direct, served = [], []
      for _ in range(_REPEATS.value):
        direct.append(bench_direct(backend, ids, _NEW_TOKENS.value))
        served.append(asyncio.run(_ask_all(service.base_url, name, texts, _NEW_TOKENS.value)))
      best_direct = _rates(min(direct, key=lambda r: r["seconds"]))
      best_served = _rates(min(served, key=lambda r: r["seconds"]))
      overhead = 1.0 - best_served["tokens_per_second"] / best_direct["tokens_per_second"]
      run = {"concurrency": c, "direct": best_direct, "server": best_served, "server_overhead": overhead,
             "all_direct_seconds": [r["seconds"] for r in direct],
             "all_server_seconds": [r["seconds"] for r in served]}
      record["runs"].append(run)
      print(f"c={c}: direct {best_direct['tokens_per_second']:.1f} tok/s, server "
            f"{best_served['tokens_per_second']:.1f} tok/s, overhead {overhead:+.1%}", flush=True)
    record["scheduler"] = service.engine.stats.to_json()
    record["scheduler"].pop("batch_requests")
    record["scheduler"].pop("batch_rows")
  print(f"\n{record['cpu_model']} ({record['cpu_count']} cores), {backend.model.cfg.name}, "
        f"{_NEW_TOKENS.value} new tokens per request")
  print(f"{'concurrent':>10}{'direct req/s':>14}{'direct tok/s':>14}{'server req/s':>14}{'server tok/s':>14}"
        f"{'overhead':>10}")
  for run in record["runs"]:
    d, s = run["direct"], run["server"]
    print(f"{run['concurrency']:>10}{d['requests_per_second']:>14.2f}{d['tokens_per_second']:>14.1f}"
          f"{s['requests_per_second']:>14.2f}{s['tokens_per_second']:>14.1f}{run['server_overhead']:>10.1%}")
  os.makedirs(_OUT.value, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  path = os.path.join(_OUT.value, f"{stamp}.json")
  results_lib.write_json(path, record)
  print(f"\nwritten: {path}")


if __name__ == "__main__":
  app.run(main)
