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


_OS_WRAPPER = """\
// Output-stationary MAC (the multiply-accumulate is XLS's gemm_pe_mac, from DSLX); forwards its operands through
// registers when FWD (systolic).
module gemm_pe #(parameter DW = 8, parameter AW = 18, parameter FWD = 1) (
  input clk, input clr, input en,
  input [DW-1:0] a_in, input [DW-1:0] b_in,
  output reg [DW-1:0] a_out, output reg [DW-1:0] b_out, output reg [AW-1:0] acc
);
  wire [AW-1:0] mac;
  gemm_pe_mac datapath (.acc(acc), .a(a_in), .b(b_in), .out(mac));
  always @(posedge clk) begin
    if (clr) acc <= {AW{1'b0}};
    else if (en) acc <= mac;
  end
  generate
    if (FWD) begin : forward
      always @(posedge clk) begin
        if (clr) begin a_out <= {DW{1'b0}}; b_out <= {DW{1'b0}}; end
        else if (en) begin a_out <= a_in; b_out <= b_in; end
      end
    end else begin : no_forward
      always @(*) begin a_out = {DW{1'b0}}; b_out = {DW{1'b0}}; end
    end
  endgenerate
endmodule
"""

_ST_WRAPPER = """\
// Stationary-operand MAC (psum_in + a_in * w is XLS's gemm_pe_mac, from DSLX), registered when systolic.
module gemm_pe #(parameter DW = 8, parameter AW = 18, parameter REG = 0) (
  input clk, input en,
  input [DW-1:0] a_in, input [DW-1:0] w, input [AW-1:0] psum_in,
  output [DW-1:0] a_out, output [AW-1:0] psum_out
);
  wire [AW-1:0] sum;
  gemm_pe_mac datapath (.psum(psum_in), .a(a_in), .w(w), .out(sum));
  generate
    if (REG) begin : registered
      reg [DW-1:0] a_q;
      reg [AW-1:0] p_q;
      always @(posedge clk) if (en) begin a_q <= a_in; p_q <= sum; end
      assign a_out = a_q;
      assign psum_out = p_q;
    end else begin : combinational
      assign a_out = a_in;
      assign psum_out = sum;
    end
  endgenerate
endmodule
"""


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
