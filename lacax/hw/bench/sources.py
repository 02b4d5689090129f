"""Problems from a config section: `load_problems(config.benchmark)` for the hardware jobs.

  kind="verilog_eval"   VerilogEval v2 at `path`, `task` "spec-to-rtl" | "code-complete"
  kind="rtllm"          RTLLM v2.0 at `path`
  kind="logikbench"     logikbench (`path` "" = the installed package; `groups`)
  kind="mg_synthetic"   generated MG-Verilog tasks (`per_template`, `seed`, `level`)

`limit` keeps the first N problems (0 = all); `ids` (comma-separated) keeps the named task ids.
"""

from __future__ import annotations

from typing import Any, Mapping

from lacax.hw.bench import loaders
from lacax.hw.bench.problem import Problem

KINDS = ("verilog_eval", "rtllm", "logikbench", "mg_synthetic")


def load_problems(section: Mapping[str, Any]) -> list[Problem]:
  kind = section.get("kind", "verilog_eval")
  path = section.get("path", "")
  if kind in ("verilog_eval", "rtllm") and not path:
    raise ValueError(f"benchmark.kind={kind!r} needs benchmark.path: the folder of your checkout "
                     "(lacax ships no benchmark data)")
  if kind == "verilog_eval":
    problems = loaders.verilog_eval(path, section.get("task", "spec-to-rtl"))
  elif kind == "rtllm":
    problems = loaders.rtllm(path)
  elif kind == "logikbench":
    groups = section.get("groups", ("basic", "arithmetic", "memory", "blocks"))
    problems = loaders.logikbench(path or None, tuple(groups.split(",") if isinstance(groups, str) else groups))
  elif kind == "mg_synthetic":
    from lacax.hw.mg_verilog import tasks  # pylint: disable=g-import-not-at-top
    ts = tasks.generate(int(section.get("per_template", 2)), seed=int(section.get("seed", 0)))
    problems = [t.problem(section.get("level", "detailed")) for t in ts]
  else:
    raise ValueError(f"benchmark.kind={kind!r} must be one of {KINDS}")
  ids = section.get("ids", "")
  if ids:
    want = [i.strip() for i in ids.split(",") if i.strip()]
    known = {p.task_id for p in problems}
    missing = [i for i in want if i not in known]
    if missing:
      raise ValueError(f"benchmark.ids: {missing} are not task ids of {kind} (e.g. {sorted(known)[:3]})")
    problems = [p for p in problems if p.task_id in want]
  limit = int(section.get("limit", 0) or 0)
  return problems[:limit] if limit > 0 else problems
