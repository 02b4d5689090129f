"""Yosys synthesis with area / timing proxies: cell counts, flip-flops, logic depth (sandboxed).

The script: `read_verilog -sv`, `synth -flatten -top T`, `abc -g <gates>` (a generic gate library; no liberty
file is available offline), `opt_clean`, `stat` (cells by type), then `ltp -noff` (the longest topological path
through combinational cells, flip-flops cut) for the logic depth.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from lacax.hw import sandbox
from lacax.hw import tools
from lacax.hw.tools import sim

ABC_GATES = "AND,NAND,OR,NOR,XOR,XNOR,ANDNOT,ORNOT,MUX"
DEFAULT_LIMITS = sandbox.Limits(wall_s=120.0)
_CELL_RE = re.compile(r"^\s+(\$?[\w$]+)\s+(\d+)\s*$", re.MULTILINE)
_LTP_RE = re.compile(r"Longest topological path in \S+ \(length=(\d+)\)")


@dataclasses.dataclass(frozen=True)
class SynthResult:
  """Area / timing proxies of one design.

  Attributes:
    ok: synthesis succeeded.
    cells: total cells after technology mapping.
    cell_types: {cell type: count}.
    flip_flops: cells that hold state ($_DFF*, $_SDFF*, $_DLATCH*, ... ).
    depth: the longest combinational path in cells (`ltp -noff`), None if not reported.
    error: the first error line when not ok.
    run: the sandboxed yosys run; versions: tool versions.
  """

  ok: bool
  cells: int
  cell_types: Mapping[str, int]
  flip_flops: int
  depth: int | None
  error: str
  run: sandbox.RunResult
  versions: Mapping[str, str | None]

  def to_json(self) -> dict[str, Any]:
    return {"ok": self.ok, "cells": self.cells, "cell_types": dict(self.cell_types), "flip_flops": self.flip_flops,
            "depth": self.depth, "error": self.error, "versions": dict(self.versions),
            "wall_s": self.run.wall_s}


def _is_state(cell: str) -> bool:
  return bool(re.search(r"DFF|DLATCH|SR_|\$mem|FF_", cell))


def parse_stat(text: str) -> tuple[int, dict[str, int]]:
  """(total cells, {type: count}) from the last `stat` report in yosys's log."""
  idx = text.rfind("Number of cells:")
  if idx < 0:
    return 0, {}
  block = text[idx:]
  total = int(re.match(r"Number of cells:\s+(\d+)", block).group(1))
  types = {}
  for name, count in _CELL_RE.findall(block.split("\n\n", 1)[0] if "\n\n" in block else block):
    types[name] = int(count)
  return total, types


def synthesize(sources: Mapping[str, str], top: str, *, flatten: bool = True, gates: str = ABC_GATES,
               limits: sandbox.Limits = DEFAULT_LIMITS) -> SynthResult:
  """Synthesises `top` from `sources` and reports cells, flip-flops and logic depth."""
  sim._check_files(sources)
  tools.require_tool("yosys")
  if not re.fullmatch(r"[A-Za-z_][\w$]*", top):
    raise ValueError(f"top={top!r} must be a Verilog identifier")
  script = "\n".join([
      *(f"read_verilog -sv {name}" for name in sources),
      f"synth {'-flatten ' if flatten else ''}-top {top}",
      f"abc -g {gates}",
      "opt_clean",
      "tee -o stat.txt stat",
      "tee -o ltp.txt ltp -noff",
  ]) + "\n"
  with sandbox.Box(limits, {**sources, "synth.ys": script}) as box:
    res = box.run(["yosys", "-q", "-s", "synth.ys"])
    stat = box.read("stat.txt") if box.exists("stat.txt") else ""
    ltp = box.read("ltp.txt") if box.exists("ltp.txt") else ""
  ok = res.ok and bool(stat)
  total, types = parse_stat(stat)
  depths = [int(d) for d in _LTP_RE.findall(ltp)]
  error = "" if ok else sim._first_error(res.stderr + "\n" + res.stdout) or (res.stopped_by or "")
  return SynthResult(ok, total, types, sum(c for t, c in types.items() if _is_state(t)),
                     max(depths) if depths else None, error, res, tools.versions())
