"""The template's processing element through HLS: its multiply-accumulate written in DSLX and built by XLS.

GPT4AIGChip's template is written for an HLS flow (the paper's is C++ with Vitis HLS). No C++ HLS tool installs
offline, so lacax's HLS route is DSLX -> XLS -> Verilog (`lacax.hw.tools.xls`, as Spec2RTL-Agent's HLS stage):

  pe_dslx(design, workload)     the DSLX function of the PE's datapath, at the workload's exact widths:
                                  os       acc + a * b      (the output-stationary accumulation)
                                  ws / is  psum + a * w     (the stationary-operand partial sum)
  pe_module(design, workload)   the `gemm_pe` module: XLS's combinational Verilog of that function, inside the
                                template's own register wrapper (accumulator, operand forwarding, the systolic
                                pipeline registers), with the template PE's ports and parameters

XLS builds datapaths from functions; the PE's registers stay in the Verilog wrapper, so the DSLX PE is a drop-in
`overrides={"gemm_pe": ...}` for `template.generate` / `evaluate.evaluate` (the job's `template.pe="dslx"`), and
its cycle count is the template's (`template.analytic_cycles`).
"""

from __future__ import annotations

import functools

from lacax.hw.aigchip import template
from lacax.hw.tools import xls

DATAPATH = "gemm_pe_mac"


def pe_dslx(design: template.Design, w: template.Workload) -> str:
  """The DSLX source of the PE's multiply-accumulate (`gemm_pe_mac`) at the workload's widths."""
  dw, aw = w.width, w.acc_width
  if design.dataflow == "os":
    args, acc, other = f"acc: uN[{aw}], a: uN[{dw}], b: uN[{dw}]", "acc", "b"
  else:
    args, acc, other = f"psum: uN[{aw}], a: uN[{dw}], w: uN[{dw}]", "psum", "w"
  return (f"// The {design.dataflow} PE's datapath: {acc} + a * {other}, exact in {aw} bits.\n"
          f"pub fn {DATAPATH}({args}) -> uN[{aw}] {{\n"
          f"  {acc} + (a as uN[{aw}]) * ({other} as uN[{aw}])\n"
          "}\n")


def _wrap(pe: str, old: str, new: str, comment: str) -> str:
  """The template's PE with its arithmetic line `old` replaced by `new` (which instantiates XLS's module)."""
  if old not in pe:
    raise AssertionError(f"the template's PE no longer holds {old!r}: update lacax/hw/aigchip/hls.py")
  return comment + "\n".join(pe.replace(old, new).splitlines()[1:]) + "\n"


# The template's own PEs (registers, forwarding, the systolic pipeline registers), their arithmetic from XLS.
_OS_WRAPPER = _wrap(template.PE_OS, "    else if (en) acc <= acc + a_in * b_in;",
                    "    else if (en) acc <= mac;",
                    "// Output-stationary MAC; acc + a_in * b_in is XLS's gemm_pe_mac (from DSLX).\n").replace(
                        "  always @(posedge clk) begin\n    if (clr) acc",
                        "  wire [AW-1:0] mac;\n  gemm_pe_mac datapath (.acc(acc), .a(a_in), .b(b_in), .out(mac));\n"
                        "  always @(posedge clk) begin\n    if (clr) acc", 1)
_ST_WRAPPER = _wrap(template.PE_ST, "  wire [AW-1:0] sum = psum_in + a_in * w;",
                    "  wire [AW-1:0] sum;\n  gemm_pe_mac datapath (.psum(psum_in), .a(a_in), .w(w), .out(sum));",
                    "// Stationary-operand MAC; psum_in + a_in * w is XLS's gemm_pe_mac (from DSLX).\n")
if not all("gemm_pe_mac datapath" in w for w in (_OS_WRAPPER, _ST_WRAPPER)):
  raise AssertionError("the template's PE changed shape: update lacax/hw/aigchip/hls.py")


def pe_module(design: template.Design, w: template.Workload) -> str:
  """The `gemm_pe` Verilog built from `pe_dslx` by XLS (wrapper + XLS's module); a failure of XLS raises
  RuntimeError naming the stage and XLS's message."""
  return _pe_module(design.dataflow == "os", w.width, w.acc_width, pe_dslx(design, w))


@functools.lru_cache(maxsize=32)
def _pe_module(stationary_output: bool, width: int, acc_width: int, dslx: str) -> str:
  del width, acc_width  # in the DSLX text; keys of the cache
  res = xls.dslx_to_verilog(dslx, DATAPATH, module="gemm_pe_dslx")
  if not res.ok:
    raise RuntimeError(f"XLS could not build the DSLX PE ({DATAPATH}) at stage {res.stage!r}: {res.error}")
  return (_OS_WRAPPER if stationary_output else _ST_WRAPPER) + "\n// XLS (combinational codegen) of:\n// " + \
      "\n// ".join(dslx.rstrip().splitlines()) + "\n" + res.verilog
