"""HLS from DSLX with Google XLS (`xls-python`, PyPI, Apache-2.0): DSLX -> IR -> optimised IR -> Verilog.

`xls-python` ships XLS's C API (no xlscc, so no C++ front end: the HLS input language is DSLX). Model-written
DSLX reaches native code that can crash (a malformed package has segfaulted the bindings in our checks), so
every call runs in a sandboxed Python subprocess, never in the caller's process. The interpreter runs under
the caller's uid (`Box(drop_user=False)`: the Python installation may sit in a private home directory) but
still without network, with a private /tmp and under resource limits.

  dslx_to_verilog  DSLX text -> (IR, optimised IR, Verilog); `pipeline_stages` set = a pipelined module with a
                   clock (`generator="pipeline"`), None = combinational
  interpret        runs the DSLX function's IR on argument tuples (XLS typed values, e.g. "bits[8]:3"): the
                   software ("C-sim") model of the design
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any, Mapping, Sequence

from lacax.hw import sandbox
from lacax.hw import tools

DEFAULT_LIMITS = sandbox.Limits(wall_s=120.0, memory_bytes=8 << 30)

_DRIVER = r'''
import json, sys, traceback
req = json.load(open("request.json"))
out = {"stage": "import"}
def done():
  json.dump(out, open("response.json", "w"))
try:
  import xls
  out["stage"] = "dslx_to_ir"
  ir = xls.convert_dslx_to_ir(req["dslx"], req["module"] + ".x", req["module"])
  out["ir"] = ir
  fn = xls.mangle_dslx_name(req["module"], req["top"]) if hasattr(xls, "mangle_dslx_name") else (
      "__%s__%s" % (req["module"], req["top"]))
  out["function"] = fn
  if req["op"] == "interpret":
    out["stage"] = "interpret"
    f = xls.Package.parse_ir(ir).get_function(fn)
    out["results"] = [str(f.interpret([xls.parse_typed_value(a) for a in args])).removeprefix("<Value ").removesuffix(">")
                      for args in req["args"]]
  else:
    out["stage"] = "optimize"
    opt = xls.optimize_ir(ir, top=fn)
    out["opt_ir"] = opt
    out["stage"] = "codegen"
    kw = dict(top=fn, module_name=req["module_name"], delay_model=req["delay_model"])
    if req["pipeline_stages"]:
      kw.update(generator="pipeline", pipeline_stages=req["pipeline_stages"])
      if req["clock_period_ps"]:
        kw["clock_period_ps"] = req["clock_period_ps"]
      if req["reset"]:
        kw["reset"] = req["reset"]
    else:
      kw["generator"] = "combinational"
    out["verilog"] = xls.Package.parse_ir(opt).schedule_and_codegen(**kw).get_verilog_text()
  out["stage"] = "done"
except BaseException as e:
  out["error"] = "%s: %s" % (type(e).__name__, e)
done()
'''


@dataclasses.dataclass(frozen=True)
class XlsResult:
  """ok; the stage reached ("dslx_to_ir", "optimize", "codegen", "interpret", "done"); error text; outputs."""

  ok: bool
  stage: str
  error: str
  ir: str = ""
  opt_ir: str = ""
  verilog: str = ""
  results: tuple[str, ...] = ()
  run: sandbox.RunResult | None = None
  versions: Mapping[str, str | None] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {"ok": self.ok, "stage": self.stage, "error": self.error, "verilog": self.verilog,
            "results": list(self.results), "versions": dict(self.versions)}


def _check_ident(name: str, field: str):
  if not re.fullmatch(r"[A-Za-z_]\w*", name or ""):
    raise ValueError(f"{field}={name!r} must be an identifier")


def _call(request: dict[str, Any], limits: sandbox.Limits) -> XlsResult:
  with sandbox.Box(limits, {"request.json": json.dumps(request), "driver.py": _DRIVER}, drop_user=False) as box:
    res = box.run([sys.executable, "-I", "driver.py"])
    resp = json.loads(box.read("response.json")) if box.exists("response.json") else {}
  if not resp:
    why = res.stopped_by or f"exit {res.returncode}"
    return XlsResult(False, "crash", f"the XLS subprocess died ({why}): {res.stderr[-500:]}", run=res,
                     versions=tools.versions())
  ok = resp.get("stage") == "done" and "error" not in resp
  return XlsResult(ok, resp.get("stage", ""), resp.get("error", ""), resp.get("ir", ""), resp.get("opt_ir", ""),
                   resp.get("verilog", ""), tuple(resp.get("results", ())), res, tools.versions())


def dslx_to_verilog(dslx: str, top: str, *, module: str = "design", module_name: str | None = None,
                    pipeline_stages: int | None = None, clock_period_ps: int | None = None,
                    delay_model: str = "unit", reset: str | None = None,
                    limits: sandbox.Limits = DEFAULT_LIMITS) -> XlsResult:
  """DSLX function `top` -> Verilog module `module_name` (default `top`), pipelined when `pipeline_stages`."""
  _check_ident(top, "top")
  _check_ident(module, "module")
  if pipeline_stages is not None and pipeline_stages < 1:
    raise ValueError(f"pipeline_stages={pipeline_stages!r} must be >= 1 (or None for combinational)")
  return _call({"op": "codegen", "dslx": dslx, "module": module, "top": top, "module_name": module_name or top,
                "pipeline_stages": pipeline_stages, "clock_period_ps": clock_period_ps,
                "delay_model": delay_model, "reset": reset}, limits)


def interpret(dslx: str, top: str, args: Sequence[Sequence[str]], *, module: str = "design",
              limits: sandbox.Limits = DEFAULT_LIMITS) -> XlsResult:
  """Interprets DSLX function `top` on each argument tuple (typed values such as "bits[8]:3")."""
  _check_ident(top, "top")
  _check_ident(module, "module")
  return _call({"op": "interpret", "dslx": dslx, "module": module, "top": top,
                "args": [list(a) for a in args]}, limits)
