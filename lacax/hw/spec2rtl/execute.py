"""The code verifiers of Spec2RTL-Agent: every stage is checked by really running it, in the sandbox.

  python   the sub-function's Python (with the earlier sub-functions' Python before it) runs in a sandboxed
           interpreter (`lacax.hw.sandbox`: own uid, no network, rlimits) on input vectors; its outputs are
           compared with the known answers (the spec's vectors for the top function, the info dict's examples for
           the others). The verified Python is the golden model of the later stages.
  cpp      g++ compiles the C++ with a generated `main` that reads input vectors on stdin and prints the
           outputs (`lacax.hw.tools.cxx`); compared with the Python golden model's outputs on the same inputs.
  hls      DSLX is converted to XLS IR and interpreted on the same inputs (`lacax.hw.tools.xls.interpret`, the
           "C-sim" of the HLS form); compared with the Python golden model.
  rtl      XLS schedules and generates Verilog from the top DSLX function (combinational, or a pipeline of
           `pipeline_stages`); an iverilog testbench written here applies the vectors (one per cycle in a
           pipeline, checking each output `pipeline_stages` cycles later) and prints VerilogEval's
           `Mismatches: N in M samples` line; yosys then synthesises the module (cells, flip-flops, depth).

Input vectors for a sub-function: its edge values (all zeros, all ones) and seeded random values for each
input, plus, for the top function, the spec's known-answer inputs. Every check returns a `Check` with the
tool's own error text, so the reflection step can trace the failure to its stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import zlib
from typing import Any, Sequence

from lacax.hw import sandbox
from lacax.hw.tools import cxx
from lacax.hw.tools import iverilog
from lacax.hw.tools import xls
from lacax.hw.tools import yosys

PYTHON_LIMITS = sandbox.Limits(wall_s=20.0, memory_bytes=1 << 30)
CXX_LIMITS = sandbox.Limits(wall_s=60.0)
CXX_RUN_LIMITS = sandbox.Limits(wall_s=10.0, memory_bytes=1 << 30)

_PY_CHECK = r'''
import json, sys
ns = {"__name__": "design"}
exec(compile(open("design.py").read(), "design.py", "exec"), ns)
name = open("name.txt").read()
f = ns.get(name)
if not callable(f):
  sys.exit("design.py defines no function %r" % name)
out = []
for args in json.load(open("vectors.json")):
  r = f(*args)
  if isinstance(r, bool):
    r = int(r)
  if not isinstance(r, int):
    sys.exit("%s%r returned %s %r, not an int" % (name, tuple(args), type(r).__name__, r))
  out.append(r)
json.dump(out, open("out.json", "w"))
'''


@dataclasses.dataclass(frozen=True)
class Port:
  name: str
  width: int

  @property
  def mask(self) -> int:
    return (1 << self.width) - 1


@dataclasses.dataclass(frozen=True)
class Check:
  """The verdict of one stage check.

  Attributes:
    ok: the stage passed.
    tool: what ran ("python", "g++", "xls-interpret", "xls-codegen", "iverilog", "yosys", "structure").
    error: the first lines of what went wrong ("" when ok): the tool's message or the first mismatching vectors.
    outputs: the outputs the code produced (when it ran).
    detail: extra figures (cells, flip-flops, depth, samples, the Verilog).
  """

  ok: bool
  tool: str
  error: str = ""
  outputs: tuple[int, ...] | None = None
  detail: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {"ok": self.ok, "tool": self.tool, "error": self.error[:2000],
            **{k: v for k, v in self.detail.items() if k != "verilog"}}


def ports(items: Sequence[Any]) -> tuple[Port, ...]:
  """Ports from info-dict entries ({"name", "width"}) or spec ports."""
  out = []
  for p in items:
    if isinstance(p, dict):
      out.append(Port(p["name"], int(p["width"])))
    else:
      out.append(Port(p.name, int(p.width)))
  return tuple(out)


def input_vectors(inputs: Sequence[Port], count: int, seed_text: str,
                  extra: Sequence[Sequence[int]] = ()) -> list[tuple[int, ...]]:
  """Edge values, `count` seeded random vectors and `extra` (e.g. the spec's known-answer inputs), deduplicated."""
  rng = random.Random(zlib.crc32(seed_text.encode()))
  rows = [tuple(0 for _ in inputs), tuple(p.mask for p in inputs)]
  rows += [tuple(rng.randrange(p.mask + 1) for p in inputs) for _ in range(count)]
  rows += [tuple(int(v) for v in r) for r in extra]
  return list(dict.fromkeys(rows))


def compare(vectors: Sequence[Sequence[int]], expected: Sequence[int], got: Sequence[int], name: str,
            inputs: Sequence[Port]) -> str:
  """"" when equal, else the count and the first three differing vectors."""
  bad = [(v, e, g) for v, e, g in zip(vectors, expected, got) if e != g]
  if len(got) != len(expected):
    return f"{name} produced {len(got)} outputs for {len(expected)} vectors"
  if not bad:
    return ""
  lines = [f"{len(bad)} of {len(expected)} vectors differ:"]
  for v, e, g in bad[:3]:
    args = ", ".join(f"{p.name}={x:#x}" for p, x in zip(inputs, v))
    lines.append(f"  {name}({args}) = {g:#x}, expected {e:#x}")
  return "\n".join(lines)


def _python() -> tuple[str, bool]:
  """The interpreter for model-written Python and whether the box may drop to its own uid: the system
  python3 (world-readable) when there is one, else this interpreter under the caller's uid."""
  for path in ("/usr/bin/python3", shutil.which("python3") or ""):
    if path and os.access(path, os.X_OK) and not path.startswith(os.path.expanduser("~")):
      return path, True
  return sys.executable, False


def run_python(code: str, name: str, vectors: Sequence[Sequence[int]], output: Port) -> Check:
  """Runs `name` from `code` on each vector in the sandbox; outputs must be ints that fit the output port."""
  exe, drop = _python()
  files = {"design.py": code, "name.txt": name, "vectors.json": json.dumps([list(v) for v in vectors]),
           "check.py": _PY_CHECK}
  with sandbox.Box(PYTHON_LIMITS, files, drop_user=drop) as box:
    res = box.run([exe, "-I", "-S", "check.py"] if drop else [exe, "-I", "check.py"])
    text = box.read("out.json") if box.exists("out.json") else ""
  if not res.ok or not text:
    why = res.stopped_by or f"exit {res.returncode}"
    return Check(False, "python", f"python failed ({why}):\n" + (res.stderr or res.stdout)[-1200:])
  outs = tuple(json.loads(text))
  wide = [o for o in outs if not 0 <= o <= output.mask]
  if wide:
    return Check(False, "python", f"{name} returned {wide[0]} which does not fit u{output.width} "
                 f"(0..{output.mask})", outs)
  return Check(True, "python", "", outs)


def c_type(width: int) -> str:
  return next(f"uint{w}_t" for w in (8, 16, 32, 64) if width <= w)


def cxx_main(name: str, inputs: Sequence[Port], output: Port) -> str:
  """A `main` that reads one vector per line (decimal) and prints `name`'s output, masked to its width."""
  decl = ", ".join(f"a{i}" for i in range(len(inputs)))
  fmt = " ".join("%llu" for _ in inputs)
  refs = ", ".join(f"&a{i}" for i in range(len(inputs)))
  args = ", ".join(f"({c_type(p.width)})a{i}" for i, p in enumerate(inputs))
  mask = "~0ULL" if output.width == 64 else f"{output.mask}ULL"
  return (f"\nint main() {{\n  unsigned long long {decl};\n"
          f"  while (scanf(\"{fmt}\", {refs}) == {len(inputs)}) {{\n"
          f"    unsigned long long r = (unsigned long long){name}({args});\n"
          f"    printf(\"%llu\\n\", r & {mask});\n  }}\n  return 0;\n}}\n")


def run_cpp(code: str, name: str, inputs: Sequence[Port], output: Port,
            vectors: Sequence[Sequence[int]]) -> Check:
  """g++-compiles `code` with a generated main and runs it on the vectors (sandboxed)."""
  source = "#include <cstdint>\n#include <cstdio>\n" + code + cxx_main(name, inputs, output)
  stdin = "".join(" ".join(str(x) for x in v) + "\n" for v in vectors)
  res = cxx.compile_and_run({"design.cpp": source}, stdin=stdin, limits=CXX_LIMITS, run_limits=CXX_RUN_LIMITS)
  if not res.ok:
    step = res.run if res.run is not None else res.compile
    return Check(False, "g++", f"{res.category}:\n" + (step.stderr or step.stdout)[-1500:])
  try:
    outs = tuple(int(line) for line in res.stdout.split())
  except ValueError:
    return Check(False, "g++", f"the program printed something other than numbers: {res.stdout[:300]!r}")
  return Check(True, "g++", "", outs)


def run_dslx(code: str, name: str, inputs: Sequence[Port], vectors: Sequence[Sequence[int]]) -> Check:
  """Converts DSLX to XLS IR and interprets function `name` on the vectors (the HLS form's C-sim)."""
  args = [[f"bits[{p.width}]:{x}" for p, x in zip(inputs, v)] for v in vectors]
  res = xls.interpret(code, name, args)
  if not res.ok:
    return Check(False, "xls-interpret", f"XLS {res.stage} failed:\n{res.error[-1500:]}")
  try:
    outs = tuple(int(r.split(":", 1)[1], 0) for r in res.results)
  except (IndexError, ValueError):
    return Check(False, "xls-interpret", f"{name} does not return a single bits value: {res.results[:1]}")
  return Check(True, "xls-interpret", "", outs)


def testbench(top: str, inputs: Sequence[Port], output: Port, vectors: Sequence[Sequence[int]],
              expected: Sequence[int], pipeline_stages: int) -> str:
  """An iverilog testbench for XLS's module (`top`, inputs by name, output `out`, `clk` when pipelined)."""
  w = output.width
  lines = ["`timescale 1ns/1ps", "module tb;"]
  lines += [f"  reg [{p.width - 1}:0] {p.name};" for p in inputs]
  lines += [f"  wire [{w - 1}:0] out;", "  integer mismatches = 0;", "  integer samples = 0;"]
  conns = ", ".join([*(["clk"] if pipeline_stages else []), *(p.name for p in inputs), "out"])
  if pipeline_stages:
    lines += ["  reg clk = 0;", "  always #5 clk = ~clk;"]
  lines.append(f"  {top} dut({', '.join(f'.{c}({c})' for c in conns.split(', '))});")
  lines += [f"  task check(input [{w - 1}:0] want, input integer index);",
            "    begin",
            "      samples = samples + 1;",
            "      if (out !== want) begin",
            "        mismatches = mismatches + 1;",
            "        if (mismatches <= 5) $display(\"MISMATCH vector %0d: out=%h expected %h\", index, out, want);",
            "      end",
            "    end",
            "  endtask",
            "  initial begin"]

  def assign(v):
    return " ".join(f"{p.name} = {p.width}'d{x};" for p, x in zip(inputs, v))

  if not pipeline_stages:
    for i, (v, e) in enumerate(zip(vectors, expected)):
      lines.append(f"    {assign(v)} #1 check({w}'d{e}, {i});")
  else:
    lat = max(1, pipeline_stages - 1)  # XLS registers only between stages: N stages, N - 1 cycles
    for i in range(len(vectors) + lat - 1):
      step = f"    {assign(vectors[i])}" if i < len(vectors) else "   "
      step += " @(posedge clk); #1;"
      if i >= lat - 1:
        j = i - lat + 1
        step += f" check({w}'d{expected[j]}, {j});"
      lines.append(step)
  lines += ["    $display(\"Mismatches: %0d in %0d samples\", mismatches, samples);", "    $finish;", "  end",
            "endmodule", ""]
  return "\n".join(lines)


def run_rtl(dslx: str, top: str, inputs: Sequence[Port], output: Port, vectors: Sequence[Sequence[int]],
            expected: Sequence[int], pipeline_stages: int, synthesize: bool = True) -> Check:
  """DSLX -> XLS -> Verilog, co-simulation in iverilog against `expected`, then yosys synthesis."""
  gen = xls.dslx_to_verilog(dslx, top, pipeline_stages=pipeline_stages or None)
  if not gen.ok:
    return Check(False, "xls-codegen", f"XLS {gen.stage} failed:\n{gen.error[-1500:]}")
  tb = testbench(top, inputs, output, vectors, expected, pipeline_stages)
  sim = iverilog.simulate({"tb.v": tb, "design.v": gen.verilog}, top="tb")
  detail: dict[str, Any] = {"verilog": gen.verilog, "testbench": tb, "samples": sim.verdict.samples if sim.verdict
                            else None, "sim_category": sim.category}
  if not sim.passed:
    out = (sim.run.stdout if sim.run else sim.compile.stderr)[-1200:]
    return Check(False, "iverilog", f"co-simulation {sim.category}: {sim.detail}\n{out}", detail=detail)
  if synthesize:
    syn = yosys.synthesize({"design.v": gen.verilog}, top)
    if not syn.ok:
      return Check(False, "yosys", f"synthesis failed: {syn.error}", detail=detail)
    detail.update(cells=syn.cells, flip_flops=syn.flip_flops, depth=syn.depth)
  return Check(True, "xls-codegen,iverilog,yosys" if synthesize else "xls-codegen,iverilog", "", detail=detail)
