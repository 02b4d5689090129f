"""Budget-forced reflection: continuing in the same KV cache vs re-sending the raw prefix, on the local backend.

  python -m experiments.bench_scale_rtl [--rounds=3] [--max_tokens=128] [--tasks=4] [--model=PATH]
      [--temperature=0.7] [--think_close='```']

The same reflection (greedy, `rounds` cues, generated MG-Verilog tasks as prompts) runs twice on the embedded
SmolLM2-135M-Instruct (or `--model`): `continuation="kv"` (a cue is a chunked prefill of its own tokens) and
`continuation="text"` (every round prefills prompt + transcript + cue again, as a completions endpoint must).
Each is run once to compile, then timed. Rows: wall seconds, prompt tokens prefilled, tokens appended into the
cache, tokens generated, cues injected (a sample that never closes its module within max_tokens gets none), and
whether both give the same text. Records the CPU model and the load average.
Writes `results/bench_scale_rtl/<timestamp>.json` and prints a table.
"""

from __future__ import annotations

import datetime
import os
import time

from absl import app
from absl import flags

from lacax import results as results_lib
from lacax.hw.backends import base
from lacax.hw.backends.local import LocalBackend
from lacax.hw.bench import harness
from lacax.hw.bench.problem import render_prompt
from lacax.hw.mg_verilog import tasks as tasks_lib
from lacax.hw.scale_rtl import reflect

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Reflection cues.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens per round.")
_TASKS = flags.DEFINE_integer("tasks", 4, "Prompts (generated tasks), one batch.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy: both routes then "
                                   "continue the same text, up to re-tokenization on the raw route).")
_MODEL = flags.DEFINE_string("model", "", "Checkpoint or GGUF ('' = the embedded SmolLM2-135M-Instruct).")
_THINK_CLOSE = flags.DEFINE_string(
    "think_close", "", "'' = the module format (a round ends at `endmodule`, ScaleRTL's no-think trigger); a "
    "marker = the think format with that end-of-think marker, e.g. '```', which a small model that rarely "
    "finishes a module does write: the cues then fire in most rows and the continuation's cost shows.")
_OUT = flags.DEFINE_string("out", "results/bench_scale_rtl", "Output folder.")


def main(argv):
  del argv
  backend = LocalBackend.load(_MODEL.value or None)
  problems = [t.problem("detailed") for t in tasks_lib.generate(1, seed=1)][:_TASKS.value]
  prompts = [render_prompt(p, "chat") for p in problems]
  sampling = base.Sampling(max_tokens=_MAX_TOKENS.value, stop=() if _THINK_CLOSE.value else ("endmodule",),
                           temperature=_TEMPERATURE.value)
  rows, texts = [], {}
  for mode in ("kv", "text"):
    trigger = (dict(format="think", think_close=_THINK_CLOSE.value, answer_tokens=_MAX_TOKENS.value)
               if _THINK_CLOSE.value else {})
    config = reflect.ReflectConfig(rounds=_ROUNDS.value, continuation=mode, **trigger)
    reflect.reflect(backend, prompts, sampling, config)  # compile
    before = dict(backend.counters)
    t = time.monotonic()
    traces = reflect.reflect(backend, prompts, sampling, config)
    wall = time.monotonic() - t
    delta = {k: backend.counters[k] - before.get(k, 0) for k in ("prefill_tokens", "extend_tokens",
                                                                  "generated_tokens")}
    texts[mode] = [[r.text for r in ts[0].rounds] for ts in traces]
    rows.append({"continuation": mode, "wall_s": wall, **delta,
                 "cues": sum(len(ts[0].rounds) - 1 for ts in traces)})
  for row in rows:
    row["same_text_as_kv"] = texts[row["continuation"]] == texts["kv"]
  record = {"rows": rows, "model": backend.describe(), "rounds": _ROUNDS.value, "max_tokens": _MAX_TOKENS.value,
            "temperature": _TEMPERATURE.value, "trigger": _THINK_CLOSE.value or "endmodule",
            "tasks": [p.task_id for p in problems], "cpu": results_lib.cpu_model(), "loadavg": os.getloadavg(),
            "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S") + ".json")
  results_lib.write_json(path, record)
  print(harness.table(rows, ["continuation", "wall_s", "prefill_tokens", "extend_tokens", "generated_tokens",
                             "cues", "same_text_as_kv"]))
  print(f"cpu: {record['cpu']}, load average {record['loadavg']}; written to {path}")


if __name__ == "__main__":
  app.run(main)
