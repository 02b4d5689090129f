"""g++ compile-and-run for C++ golden models (model-written C++ included), sandboxed."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from lacax.hw import sandbox
from lacax.hw import tools

DEFAULT_LIMITS = sandbox.Limits(wall_s=60.0)
CATEGORIES = ("ok", "compile_error", "timeout", "resource_limit", "runtime_error")


@dataclasses.dataclass(frozen=True)
class CxxResult:
  """category: one of CATEGORIES; stdout of the program; both sandboxed steps; tool versions."""

  category: str
  stdout: str
  compile: sandbox.RunResult
  run: sandbox.RunResult | None
  versions: Mapping[str, str | None]

  @property
  def ok(self) -> bool:
    return self.category == "ok"

  def to_json(self) -> dict[str, Any]:
    return {"category": self.category, "stdout": self.stdout[-2000:], "compile": self.compile.to_json(),
            "run": self.run.to_json() if self.run else None, "versions": dict(self.versions)}


def compile_and_run(sources: Mapping[str, str], *, args: Sequence[str] = (), stdin: str | None = None,
                    std: str = "c++17", flags: Sequence[str] = ("-O1",), limits: sandbox.Limits = DEFAULT_LIMITS,
                    run_limits: sandbox.Limits | None = None) -> CxxResult:
  """Compiles the `.cpp`/`.cc` files of `sources` (headers may be among them) and runs the program."""
  if not sources:
    raise ValueError("sources is empty: give {file name: C++ text}")
  tools.require_tool("g++")
  units = [n for n in sources if n.endswith((".cpp", ".cc", ".cxx", ".C"))]
  if not units:
    raise ValueError(f"sources {sorted(sources)} has no .cpp / .cc translation unit")
  with sandbox.Box(limits, sources) as box:
    comp = box.run(["g++", f"-std={std}", *flags, "-o", "prog", *units])
    if not comp.ok:
      category = ("timeout" if comp.stopped_by in ("wall_time", "cpu_time") else
                  "resource_limit" if comp.stopped_by else "compile_error")
      return CxxResult(category, "", comp, None, tools.versions())
    res = box.run(["./prog", *args], stdin=stdin, limits=run_limits or limits)
  if res.stopped_by in ("wall_time", "cpu_time"):
    category = "timeout"
  elif res.stopped_by is not None:
    category = "resource_limit"
  elif res.returncode != 0:
    category = "runtime_error"
  else:
    category = "ok"
  return CxxResult(category, res.stdout, comp, res, tools.versions())
