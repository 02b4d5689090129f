"""Harness throughput: problems simulated per minute (compile + simulate in the sandbox), 1 and 2 workers.

  python -m experiments.bench_harness [--workers=1,2] [--per_template=4] [--verilog_eval=/path/to/verilog-eval]

Scores the oracle's answers (reference designs: every sample runs to the end of its testbench) on generated
MG-Verilog tasks (16 templates x `per_template`, no data needed) and, with `--verilog_eval`, on VerilogEval v2
spec-to-rtl; with `--mutants`, also the mutants (every sample a mismatch). Each row: problems, wall seconds,
problems per minute, the speed-up over 1 worker. Records the CPU model, the core count and the tool versions.
Writes `results/bench_harness/<timestamp>.json` and prints a table.
"""

from __future__ import annotations

import datetime
import os
import time

from absl import app
from absl import flags

from lacax import results as results_lib
from lacax.hw import sandbox
from lacax.hw import tools
from lacax.hw.bench import harness, loaders
from lacax.hw.mg_verilog import tasks as tasks_lib

_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker counts to measure.")
_PER_TEMPLATE = flags.DEFINE_integer("per_template", 4, "Generated tasks per template.")
_VERILOG_EVAL = flags.DEFINE_string("verilog_eval", "", "A VerilogEval v2 checkout (optional).")
_MUTANTS = flags.DEFINE_bool("mutants", True, "Also time the mutants (failing designs).")
_OUT = flags.DEFINE_string("out", "results/bench_harness", "Output folder.")


def measure(name, problems, answers, workers):
  t = time.monotonic()
  results = harness.score_answers(problems, answers, workers=workers)
  wall = time.monotonic() - t
  n = sum(len(a) for a in answers)
  return {"set": name, "workers": workers, "problems": n, "wall_s": wall, "per_minute": 60.0 * n / wall,
          "passed": sum(r.c for r in results)}


def main(argv):
  del argv
  ts = tasks_lib.generate(_PER_TEMPLATE.value, seed=0)
  sets = [("mg_synthetic/reference", [t.problem("detailed") for t in ts], [[t.reference] for t in ts])]
  if _MUTANTS.value:
    sets.append(("mg_synthetic/mutant", [t.problem("detailed") for t in ts], [[t.mutant] for t in ts]))
  if _VERILOG_EVAL.value:
    ve = loaders.verilog_eval(_VERILOG_EVAL.value, "spec-to-rtl")
    sets.append(("verilog_eval_v2/spec-to-rtl", ve, [[p.reference_answer()] for p in ve]))
  rows = []
  for name, problems, answers in sets:
    base = None
    for w in [int(x) for x in _WORKERS.value]:
      row = measure(name, problems, answers, w)
      base = base or row["per_minute"]
      row["speedup"] = row["per_minute"] / base
      rows.append(row)
      print(f"{name} workers={w}: {row['problems']} in {row['wall_s']:.1f}s = {row['per_minute']:.0f}/min")
  record = {"rows": rows, "cpu": results_lib.cpu_model(), "cores": sandbox.default_workers(), "versions": tools.versions(),
            "isolation": sandbox.isolation(), "loadavg": os.getloadavg(),
            "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S") + ".json")
  results_lib.write_json(path, record)
  print(harness.table(rows, ["set", "workers", "problems", "wall_s", "per_minute", "speedup", "passed"]))
  print(f"cpu: {record['cpu']} ({record['cores']} cores), load average {record['loadavg']}")
  print(f"written to {path}")


if __name__ == "__main__":
  app.run(main)
