"""The EDA and compiler tools lacax checks model output with, each run inside `lacax.hw.sandbox`.

  iverilog   Icarus Verilog compile + `vvp` simulation, VerilogEval's flags, mismatch parsing (`sim`)
  verilator  second simulator: `--lint-only` and `--binary --timing` simulation
  yosys      synthesis with area / timing proxies (cells, flip-flops, logic depth)
  cxx        g++ compile-and-run for C++ golden models
  xls        DSLX -> IR -> optimised IR -> pipelined Verilog (Google XLS through `xls-python`), IR interpretation

`versions()` records the version of every tool; every result carries it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import shutil
import subprocess


def _first_line(cmd: list[str]) -> str | None:
  if shutil.which(cmd[0]) is None:
    return None
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  text = (out.stdout + out.stderr).strip()
  return text.splitlines()[0].strip() if text else None


@functools.cache
def versions() -> dict[str, str | None]:
  """{"iverilog", "yosys", "verilator", "g++", "xls-python"}: the version line of each, None where absent."""
  v = {
      "iverilog": _first_line(["iverilog", "-V"]),
      "yosys": _first_line(["yosys", "-V"]),
      "verilator": _first_line(["verilator", "--version"]),
      "g++": _first_line(["g++", "--version"]),
  }
  if v["iverilog"]:
    m = re.search(r"version (\S+)", v["iverilog"])
    v["iverilog"] = m.group(1) if m else v["iverilog"]
  try:
    v["xls-python"] = importlib.metadata.version("xls-python")
  except importlib.metadata.PackageNotFoundError:
    v["xls-python"] = None
  return v


def require_tool(name: str) -> str:
  """The path of executable `name`, or a RuntimeError that says how to install it."""
  path = shutil.which(name)
  if path is None:
    raise RuntimeError(f"tool {name!r} is not on PATH; install it (Debian: apt-get install -y iverilog yosys "
                       "verilator g++)")
  return path
