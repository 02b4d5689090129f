"""GPT4AIGChip's decoupled GEMM accelerator template, written by lacax in Verilog (arXiv 2309.10730, §III).

`generate(design, workload) -> {file name: Verilog}` writes one accelerator for one set of knobs. It is built from
separate modules, as the paper's LLM-friendly template asks (each can be replaced by model-written code with
`overrides`):

  gemm_buffer    banked on-chip buffer: `banks` single-port banks of `buf_depth` words; element e of a buffer
                 lives in bank e % banks, row e / banks; a vector port moves `banks` consecutive words per cycle
                 through a rotation crossbar; a host port loads / reads single words (not timed)
  gemm_pe        one multiply-accumulate processing element
  gemm_array     the PE array and its interconnect:
                   output-stationary: each PE keeps one output; "broadcast" sends operand vectors to a whole
                   row / column in one cycle, "systolic" passes them PE to PE (skewed injection, fill / drain)
                   weight- / input-stationary: each PE keeps one stationary operand; "broadcast" reduces a column
                   with an adder chain in one cycle, "systolic" is a pipeline that passes inputs right and partial
                   sums down, PE to PE: skewed inputs, deskewed sums, one streamed vector a beat (a beat is the
                   cycles the banks need to fetch one vector or store one, max(ceil(rows / banks),
                   ceil(cols / banks))), and the array's latency of rows + cols - 1 beats once per tile
  gemm_accel     the top: three buffers (operand 0, operand 1, outputs), staging registers, the controller (FSM)

Knobs (`Design`): array size (`rows` x `cols`), `interconnect` (broadcast | systolic), `buf_depth`, `banks`,
`dataflow` (os | ws | is). The GEMM is C[M, N] = A[M, K] @ B[K, N] of unsigned `width`-bit integers with exact
accumulators (2 * width + ceil(log2 K) bits). How the dataflows map the GEMM onto the array:

  os   rows <- M, cols <- N, time <- K; operand 0 = A (columns of a row tile), operand 1 = B (rows of a column tile)
  ws   rows <- K, cols <- N, time <- M; stationary B tiles (operand 1), streamed rows of A (operand 0)
  is   rows <- K, cols <- M, time <- N; stationary A^T tiles (operand 1), streamed columns of B (operand 0)

Each operand is stored in the layout its dataflow reads (`layout`), so every vector read is a run of consecutive
addresses and never has a bank conflict; the cycle count is then exactly `analytic_cycles` (checked against the
simulation by the tests for every dataflow and interconnect).

The buffers hold whole operands (no off-chip traffic is modelled): `banks * buf_depth` must be at least the
largest matrix, else the design is infeasible (`problems`). Buffer depth therefore costs area and only has to fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping

import numpy as np

DATAFLOWS = ("os", "ws", "is")
INTERCONNECTS = ("broadcast", "systolic")
MODULES = ("gemm_buffer", "gemm_pe", "gemm_array", "gemm_accel")
TEMPLATE_VERSION = 2  # 2: the systolic weight- / input-stationary arrays are pipelined


def _pow2(x: int) -> bool:
  return isinstance(x, int) and x >= 1 and (x & (x - 1)) == 0


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _clog2(x: int) -> int:
  return max(1, math.ceil(math.log2(x))) if x > 1 else 1


@dataclasses.dataclass(frozen=True)
class Design:
  """The five knobs of the paper's design space (§IV): MAC-array size, NoC style, buffer size, buffer partition
  (banking) and data-reuse pattern (dataflow)."""

  rows: int = 2
  cols: int = 2
  interconnect: str = "broadcast"
  buf_depth: int = 16
  banks: int = 2
  dataflow: str = "os"

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Design":
    """A design from a JSON object; unknown keys and wrong types are named in the error."""
    if not isinstance(d, Mapping):
      raise ValueError(f"design must be a JSON object of knobs {KNOB_NAMES}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(KNOB_NAMES))
    if unknown:
      raise ValueError(f"design has unknown knob(s) {unknown}; the knobs are {list(KNOB_NAMES)}")
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name not in d:
        continue
      v = d[f.name]
      if f.type in ("int", int):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
          raise ValueError(f"design.{f.name}={v!r} must be an integer")
        try:
          iv = int(v)
        except ValueError:
          raise ValueError(f"design.{f.name}={v!r} must be an integer") from None
        if iv != float(v):
          raise ValueError(f"design.{f.name}={v!r} must be an integer")
        kw[f.name] = iv
      else:
        if not isinstance(v, str):
          raise ValueError(f"design.{f.name}={v!r} must be a string")
        kw[f.name] = v.strip().lower()
    return cls(**kw)

  def key(self) -> str:
    return json.dumps(self.to_json(), sort_keys=True)


KNOB_NAMES = tuple(f.name for f in dataclasses.fields(Design))


@dataclasses.dataclass(frozen=True)
class Workload:
  """One GEMM: C[m, n] = A[m, k] @ B[k, n], unsigned `width`-bit entries drawn with `seed`."""

  m: int = 4
  k: int = 4
  n: int = 4
  width: int = 8
  seed: int = 0

  def __post_init__(self):
    for name in ("m", "k", "n"):
      v = getattr(self, name)
      if not isinstance(v, int) or not 1 <= v <= 64:
        raise ValueError(f"workload.{name}={v!r} must be an integer in [1, 64]")
    if not isinstance(self.width, int) or not 1 <= self.width <= 12:
      raise ValueError(f"workload.width={self.width!r} must be an integer in [1, 12] (accumulators stay within 32 bits)")

  @property
  def acc_width(self) -> int:
    return 2 * self.width + (math.ceil(math.log2(self.k)) if self.k > 1 else 0)

  def matrices(self) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(self.seed)
    hi = 1 << self.width
    return (rng.integers(0, hi, size=(self.m, self.k), dtype=np.int64),
            rng.integers(0, hi, size=(self.k, self.n), dtype=np.int64))

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# The knob ranges the search explores (and `problems` accepts).
SPACE = {
    "rows": (1, 2, 4, 8, 16),
    "cols": (1, 2, 4, 8, 16),
    "interconnect": INTERCONNECTS,
    "buf_depth": (2, 4, 8, 16, 32, 64, 128, 256),
    "banks": (1, 2, 4, 8, 16),
    "dataflow": DATAFLOWS,
}


def mapping(design: Design, w: Workload) -> dict[str, int]:
  """How the GEMM maps onto the array: the dimension on rows / cols / time and the tile counts."""
  if design.dataflow == "os":
    return {"row_dim": w.m, "col_dim": w.n, "time": w.k, "tiles0": w.m // design.rows, "tiles1": w.n // design.cols}
  if design.dataflow == "ws":
    return {"row_dim": w.k, "col_dim": w.n, "time": w.m, "tiles0": w.n // design.cols, "tiles1": w.k // design.rows}
  return {"row_dim": w.k, "col_dim": w.m, "time": w.n, "tiles0": w.m // design.cols, "tiles1": w.k // design.rows}


def problems(design: Design, w: Workload) -> list[str]:
  """Why `design` cannot run `w` (empty when it can): each knob out of range, a dimension the array does not
  divide, or buffers too small for the operands."""
  out = []
  for name, allowed in SPACE.items():
    v = getattr(design, name)
    if v not in allowed:
      out.append(f"design.{name}={v!r} must be one of {list(allowed)}")
  if out:
    return out
  mp = mapping(design, w)
  axes = {"os": ("m", "n"), "ws": ("k", "n"), "is": ("k", "m")}[design.dataflow]
  if mp["row_dim"] % design.rows:
    out.append(f"design.rows={design.rows} must divide workload.{axes[0]}={mp['row_dim']} (dataflow "
               f"{design.dataflow!r} maps {axes[0]} onto the rows)")
  if mp["col_dim"] % design.cols:
    out.append(f"design.cols={design.cols} must divide workload.{axes[1]}={mp['col_dim']} (dataflow "
               f"{design.dataflow!r} maps {axes[1]} onto the columns)")
  need = max(w.m * w.k, w.k * w.n, w.m * w.n)
  if design.banks * design.buf_depth < need:
    out.append(f"design.banks * design.buf_depth = {design.banks * design.buf_depth} words must hold the largest "
               f"matrix ({need} words)")
  return out


def analytic_cycles(design: Design, w: Workload) -> int:
  """Cycles from `start` to `done` (the controller's schedule, state by state; see `_controller`)."""
  errs = problems(design, w)
  if errs:
    raise ValueError("; ".join(errs))
  r, c, b = design.rows, design.cols, design.banks
  mp = mapping(design, w)
  tiles = mp["tiles0"] * mp["tiles1"]
  systolic = design.interconnect == "systolic"
  if design.dataflow == "os":
    fetch = max(_cdiv(r, b), _cdiv(c, b))
    per_tile = 1 + mp["time"] * (fetch + 1) + (r + c - 2 if systolic else 0) + _cdiv(r * c, b)
  elif systolic:  # pipelined: one streamed vector a beat, plus the array's latency of r + c - 1 beats
    per_tile = 1 + _cdiv(r * c, b) + (mp["time"] + r + c - 1) * max(_cdiv(r, b), _cdiv(c, b))
  else:
    per_tile = 1 + _cdiv(r * c, b) + mp["time"] * (_cdiv(r, b) + _cdiv(c, b))
  return tiles * per_tile


def layout(design: Design, w: Workload, a: np.ndarray, b: np.ndarray) -> tuple[dict[int, int], dict[int, int],
                                                                               dict[tuple[int, int], int]]:
  """(operand 0 {address: value}, operand 1 {address: value}, {(i, j) of C: its address in the output buffer})."""
  r, c = design.rows, design.cols
  op0, op1, out = {}, {}, {}
  if design.dataflow == "os":
    for i in range(w.m):
      for k in range(w.k):
        op0[((i // r) * w.k + k) * r + i % r] = int(a[i, k])
    for k in range(w.k):
      for j in range(w.n):
        op1[((j // c) * w.k + k) * c + j % c] = int(b[k, j])
    t1 = w.n // c
    for i in range(w.m):
      for j in range(w.n):
        out[(i, j)] = ((i // r) * t1 + j // c) * r * c + (i % r) * c + j % c
    return op0, op1, out
  kt = w.k // r
  if design.dataflow == "ws":  # stationary B tiles, rows of A streamed
    for m in range(w.m):
      for k in range(w.k):
        op0[((k // r) * w.m + m) * r + k % r] = int(a[m, k])
    for k in range(w.k):
      for j in range(w.n):
        op1[((j // c) * kt + k // r) * r * c + (k % r) * c + j % c] = int(b[k, j])
    for m in range(w.m):
      for j in range(w.n):
        out[(m, j)] = ((j // c) * w.m + m) * c + j % c
    return op0, op1, out
  for k in range(w.k):  # "is": stationary A^T tiles, columns of B streamed
    for n in range(w.n):
      op0[((k // r) * w.n + n) * r + k % r] = int(b[k, n])
  for m in range(w.m):
    for k in range(w.k):
      op1[((m // c) * kt + k // r) * r * c + (k % r) * c + m % c] = int(a[m, k])
  for m in range(w.m):
    for n in range(w.n):
      out[(m, n)] = ((m // c) * w.n + n) * c + m % c
  return op0, op1, out


# --- Verilog ----------------------------------------------------------------------------------------------------

BUFFER = """\
// Banked buffer: B banks of D words of W bits. Element e is bank e % B, row e / B. The vector port moves the B
// consecutive elements starting at v_base (lane j <-> element v_base + j) through a rotation crossbar.
module gemm_buffer #(parameter W = 8, parameter B = 2, parameter LB = 1, parameter D = 16, parameter AB = 5) (
  input clk,
  input hw_en, input [AB-1:0] hw_addr, input [W-1:0] hw_data,
  input [AB-1:0] hr_addr, output [W-1:0] hr_data,
  input [AB-1:0] v_base, input v_we, input [B-1:0] v_mask, input [B*W-1:0] v_wdata, output [B*W-1:0] v_rdata
);
  wire [B*W-1:0] bank_out;
  wire [B*W-1:0] host_out;
  genvar q, j;
  generate
    for (q = 0; q < B; q = q + 1) begin : bank
      reg [W-1:0] mem [0:D-1];
      wire [LB:0] lane = (q - v_base) & (B - 1);
      wire [AB-1:0] row = (v_base + lane) >> LB;
      wire [AB-1:0] hrow = hr_addr >> LB;
      assign bank_out[q*W +: W] = (row < D) ? mem[row] : {W{1'b0}};
      assign host_out[q*W +: W] = (hrow < D) ? mem[hrow] : {W{1'b0}};
      always @(posedge clk) begin
        if (hw_en && ((hw_addr & (B - 1)) == q))
          mem[hw_addr >> LB] <= hw_data;
        else if (v_we && v_mask[lane] && row < D)
          mem[row] <= v_wdata[lane*W +: W];
      end
    end
    for (j = 0; j < B; j = j + 1) begin : lanes
      wire [LB:0] src = (v_base + j) & (B - 1);
      assign v_rdata[j*W +: W] = bank_out[src*W +: W];
    end
  endgenerate
  wire [LB:0] hbank = hr_addr & (B - 1);
  assign hr_data = host_out[hbank*W +: W];
endmodule
"""

PE_OS = """\
// Output-stationary MAC: keeps one output; forwards its operands through registers when FWD (systolic).
module gemm_pe #(parameter DW = 8, parameter AW = 18, parameter FWD = 1) (
  input clk, input clr, input en,
  input [DW-1:0] a_in, input [DW-1:0] b_in,
  output reg [DW-1:0] a_out, output reg [DW-1:0] b_out, output reg [AW-1:0] acc
);
  always @(posedge clk) begin
    if (clr) acc <= {AW{1'b0}};
    else if (en) acc <= acc + a_in * b_in;
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

PE_ST = """\
// Stationary-operand MAC: w is held by the array; psum_out = psum_in + a_in * w (registered when systolic).
module gemm_pe #(parameter DW = 8, parameter AW = 18, parameter REG = 0) (
  input clk, input en,
  input [DW-1:0] a_in, input [DW-1:0] w, input [AW-1:0] psum_in,
  output [DW-1:0] a_out, output [AW-1:0] psum_out
);
  wire [AW-1:0] sum = psum_in + a_in * w;
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


def _array_os(design: Design) -> str:
  r, c = design.rows, design.cols
  systolic = design.interconnect == "systolic"
  lines = [
      f"// {r} x {c} output-stationary PE array, {design.interconnect} interconnect.",
      "module gemm_array #(parameter DW = 8, parameter AW = 18) (",
      "  input clk, input clr, input en,",
      f"  input [{r}*DW-1:0] a_vec, input [{c}*DW-1:0] b_vec, output [{r * c}*AW-1:0] acc_flat",
      ");",
      f"  wire [DW-1:0] a_link [0:{r - 1}][0:{c}];",
      f"  wire [DW-1:0] b_link [0:{r}][0:{c - 1}];",
      "  genvar r, c;",
      "  generate",
  ]
  if systolic:  # skewed injection: row r (column c) enters r (c) steps late, through a cleared delay line
    lines += [
        f"    for (r = 0; r < {r}; r = r + 1) begin : arow",
        "      if (r == 0) begin : direct",
        "        assign a_link[r][0] = a_vec[r*DW +: DW];",
        "      end else begin : delay",
        "        reg [DW-1:0] dl [0:r-1];",
        "        integer i;",
        "        always @(posedge clk) begin",
        "          if (clr) for (i = 0; i < r; i = i + 1) dl[i] <= {DW{1'b0}};",
        "          else if (en) begin",
        "            dl[0] <= a_vec[r*DW +: DW];",
        "            for (i = 1; i < r; i = i + 1) dl[i] <= dl[i-1];",
        "          end",
        "        end",
        "        assign a_link[r][0] = dl[r-1];",
        "      end",
        "    end",
        f"    for (c = 0; c < {c}; c = c + 1) begin : bcol",
        "      if (c == 0) begin : direct",
        "        assign b_link[0][c] = b_vec[c*DW +: DW];",
        "      end else begin : delay",
        "        reg [DW-1:0] dl [0:c-1];",
        "        integer i;",
        "        always @(posedge clk) begin",
        "          if (clr) for (i = 0; i < c; i = i + 1) dl[i] <= {DW{1'b0}};",
        "          else if (en) begin",
        "            dl[0] <= b_vec[c*DW +: DW];",
        "            for (i = 1; i < c; i = i + 1) dl[i] <= dl[i-1];",
        "          end",
        "        end",
        "        assign b_link[0][c] = dl[c-1];",
        "      end",
        "    end",
    ]
  lines += [
      f"    for (r = 0; r < {r}; r = r + 1) begin : prow",
      f"      for (c = 0; c < {c}; c = c + 1) begin : pcol",
      "        wire [DW-1:0] a_in, b_in;",
  ]
  if systolic:
    lines += ["        assign a_in = a_link[r][c];", "        assign b_in = b_link[r][c];"]
  else:
    lines += ["        assign a_in = a_vec[r*DW +: DW];", "        assign b_in = b_vec[c*DW +: DW];"]
  lines += [
      f"        gemm_pe #(.DW(DW), .AW(AW), .FWD({1 if systolic else 0})) pe (.clk(clk), .clr(clr), .en(en),",
      "          .a_in(a_in), .b_in(b_in),",
      f"          .a_out(a_link[r][c+1]), .b_out(b_link[r+1][c]), .acc(acc_flat[(r*{c}+c)*AW +: AW]));",
      "      end",
      "    end",
      "  endgenerate",
      "endmodule",
      "",
  ]
  return "\n".join(lines)


def _array_st(design: Design) -> str:
  r, c = design.rows, design.cols
  systolic = design.interconnect == "systolic"
  if systolic:
    head = [
        f"// {r} x {c} stationary-operand PE array, systolic: a pipeline taking one input vector a beat (en). Row r's",
        "// input enters r beats late (a skew line), inputs pass right and partial sums down through each PE's",
        f"// registers, and column c's sum leaves through {c} - 1 - c more (a deskew line): the {c} sums of one vector",
        f"// leave together, {r + c - 1} beats after it entered.",
    ]
  else:
    head = [f"// {r} x {c} stationary-operand PE array, broadcast: inputs enter row r from the left, partial sums run",
            "// down each column through an adder chain (combinational)."]
  lines = head + [
      "module gemm_array #(parameter DW = 8, parameter AW = 18) (",
      "  input clk, input en,",
      f"  input [{r}*DW-1:0] a_vec, input [{r * c}*DW-1:0] w_flat, output [{c}*AW-1:0] psum",
      ");",
      f"  wire [DW-1:0] a_link [0:{r - 1}][0:{c}];",
      f"  wire [AW-1:0] p_link [0:{r}][0:{c - 1}];",
      "  genvar r, c;",
      "  generate",
  ]
  if systolic:
    lines += [
        f"    for (r = 0; r < {r}; r = r + 1) begin : edge_a",
        "      if (r == 0) begin : direct",
        "        assign a_link[r][0] = a_vec[r*DW +: DW];",
        "      end else begin : skew",
        "        reg [DW-1:0] dl [0:r-1];",
        "        integer i;",
        "        always @(posedge clk) if (en) begin",
        "          dl[0] <= a_vec[r*DW +: DW];",
        "          for (i = 1; i < r; i = i + 1) dl[i] <= dl[i-1];",
        "        end",
        "        assign a_link[r][0] = dl[r-1];",
        "      end",
        "    end",
        f"    for (c = 0; c < {c}; c = c + 1) begin : edge_p",
        "      assign p_link[0][c] = {AW{1'b0}};",
        f"      if (c == {c - 1}) begin : direct",
        f"        assign psum[c*AW +: AW] = p_link[{r}][c];",
        "      end else begin : deskew",
        f"        reg [AW-1:0] dq [0:{c - 2}-c];",
        "        integer i;",
        "        always @(posedge clk) if (en) begin",
        f"          dq[0] <= p_link[{r}][c];",
        f"          for (i = 1; i <= {c - 2} - c; i = i + 1) dq[i] <= dq[i-1];",
        "        end",
        f"        assign psum[c*AW +: AW] = dq[{c - 2}-c];",
        "      end",
        "    end",
    ]
  else:
    lines += [
        f"    for (r = 0; r < {r}; r = r + 1) begin : edge_a",
        "      assign a_link[r][0] = a_vec[r*DW +: DW];",
        "    end",
        f"    for (c = 0; c < {c}; c = c + 1) begin : edge_p",
        "      assign p_link[0][c] = {AW{1'b0}};",
        f"      assign psum[c*AW +: AW] = p_link[{r}][c];",
        "    end",
    ]
  lines += [
      f"    for (r = 0; r < {r}; r = r + 1) begin : prow",
      f"      for (c = 0; c < {c}; c = c + 1) begin : pcol",
      f"        gemm_pe #(.DW(DW), .AW(AW), .REG({1 if systolic else 0})) pe (.clk(clk), .en(en),",
      f"          .a_in(a_link[r][c]), .w(w_flat[(r*{c}+c)*DW +: DW]), .psum_in(p_link[r][c]),",
      "          .a_out(a_link[r][c+1]), .psum_out(p_link[r+1][c]));",
      "      end",
      "    end",
      "  endgenerate",
      "endmodule",
      "",
  ]
  return "\n".join(lines)


def _stage(name: str, length: int, banks: int, width: str, load: str, src: str) -> list[str]:
  """Staging registers `name[0..length-1]`, loaded from the vector lanes of `src` in sub-vector p."""
  return [
      f"  reg [{width}-1:0] {name} [0:{length - 1}];",
      f"  wire [{length}*{width}-1:0] {name}_flat;",
      "  genvar g_" + name + ";",
      "  generate",
      f"    for (g_{name} = 0; g_{name} < {length}; g_{name} = g_{name} + 1) begin : st_{name}",
      f"      assign {name}_flat[g_{name}*{width} +: {width}] = {name}[g_{name}];",
      f"      always @(posedge clk) if ({load} && p == g_{name} / {banks})",
      f"        {name}[g_{name}] <= {src}[(g_{name} % {banks})*{width} +: {width}];",
      "    end",
      "  endgenerate",
  ]


def _lane_mux(src: str, length: int, banks: int, subvectors: int, add: str) -> list[str]:
  """Write lanes of the output buffer: lane j in sub-vector p carries element p * banks + j of `src` (a case on
  p per lane, not a variable shift: synthesis stays small); `add` prefixes the value (read-modify-write)."""
  out = []
  for j in range(banks):
    out.append(f"  reg [AW-1:0] wl{j};")
    out.append(f"  reg wm{j};")
    out.append("  always @(*) begin")
    out.append(f"    wl{j} = {{AW{{1'b0}}}}; wm{j} = 1'b0;")
    out.append("    case (p)")
    for p in range(subvectors):
      e = p * banks + j
      if e < length:
        out.append(f"      {p}: begin wl{j} = {src}[{e}*AW +: AW]; wm{j} = 1'b1; end")
    out.append("      default: ;")
    out.append("    endcase")
    out.append("  end")
    out.append(f"  assign mask2[{j}] = wm{j};")
    out.append(f"  assign wlanes2[{j}*AW +: AW] = {add.replace('LANE', str(j))}wl{j};")
  return out


def _next_tile(t0n: int, t1n: int, indent: str) -> list[str]:
  """Controller lines after a tile: the next t1 (inner), else the next t0, else done; each new tile starts in
  S_INIT."""
  return [
      f"{indent}if (t1 == {t1n - 1}) begin",
      f"{indent}  t1 <= 0;",
      f"{indent}  if (t0 == {t0n - 1}) state <= S_DONE; else begin t0 <= t0 + 1; state <= S_INIT; end",
      f"{indent}end else begin t1 <= t1 + 1; state <= S_INIT; end",
  ]


def _fsm(first: str, states: list[str]) -> list[str]:
  """The controller: idle until start, S_INIT clears the counters and goes to `first`, then `states` (the
  dataflow's own case items), S_DONE holds."""
  return [
      "  always @(posedge clk) begin",
      "    if (rst) state <= S_IDLE;",
      "    else case (state)",
      "      S_IDLE: if (start) begin state <= S_INIT; t0 <= 0; t1 <= 0; k <= 0; p <= 0; end",
      f"      S_INIT: begin k <= 0; p <= 0; state <= {first}; end",
      *states,
      "      S_DONE: state <= S_DONE;",
      "      default: state <= S_IDLE;",
      "    endcase",
      "  end",
  ]


def _top(design: Design, w: Workload) -> str:
  r, c, b = design.rows, design.cols, design.banks
  mp = mapping(design, w)
  depth = design.buf_depth
  ab = _clog2(b * depth)
  lb = int(math.log2(b))
  t0n, t1n, time = mp["tiles0"], mp["tiles1"], mp["time"]
  os_ = design.dataflow == "os"
  systolic = design.interconnect == "systolic"
  head = [
      f"// GEMM accelerator: {design.dataflow} dataflow, {r} x {c} PEs, {design.interconnect}, {b} bank(s) x "
      f"{depth} words; C[{w.m},{w.n}] = A[{w.m},{w.k}] @ B[{w.k},{w.n}], {w.width}-bit inputs.",
      "module gemm_accel (",
      "  input clk, input rst, input start, output done,",
      f"  input host_we, input [1:0] host_sel, input [{ab - 1}:0] host_addr, input [31:0] host_wdata,",
      f"  input [{ab - 1}:0] host_raddr, output [{w.acc_width - 1}:0] host_rdata",
      ");",
      f"  localparam DW = {w.width};",
      f"  localparam AW = {w.acc_width};",
      "  localparam S_IDLE = 0, S_INIT = 1, S_FETCH = 2, S_MAC = 3, S_FLUSH = 4, S_WB = 5, S_DONE = 6,",
      "             S_PRE = 7, S_SWRITE = 8;",
      "  reg [3:0] state;",
      "  reg [15:0] t0, t1, k, p;",
      "  assign done = (state == S_DONE);",
      f"  wire [{ab - 1}:0] base0, base1, base2;",
      "  wire we2;",
      f"  wire [{b - 1}:0] mask2;",
      f"  wire [{b}*DW-1:0] lanes0, lanes1;",
      f"  wire [{b}*AW-1:0] lanes2, wlanes2;",
      f"  gemm_buffer #(.W(DW), .B({b}), .LB({lb}), .D({depth}), .AB({ab})) buf0 (.clk(clk),",
      "    .hw_en(host_we && host_sel == 2'd0), .hw_addr(host_addr), .hw_data(host_wdata[DW-1:0]),",
      f"    .hr_addr({{{ab}{{1'b0}}}}), .hr_data(), .v_base(base0), .v_we(1'b0), .v_mask({{{b}{{1'b0}}}}),",
      f"    .v_wdata({{({b}*DW){{1'b0}}}}), .v_rdata(lanes0));",
      f"  gemm_buffer #(.W(DW), .B({b}), .LB({lb}), .D({depth}), .AB({ab})) buf1 (.clk(clk),",
      "    .hw_en(host_we && host_sel == 2'd1), .hw_addr(host_addr), .hw_data(host_wdata[DW-1:0]),",
      f"    .hr_addr({{{ab}{{1'b0}}}}), .hr_data(), .v_base(base1), .v_we(1'b0), .v_mask({{{b}{{1'b0}}}}),",
      f"    .v_wdata({{({b}*DW){{1'b0}}}}), .v_rdata(lanes1));",
      f"  gemm_buffer #(.W(AW), .B({b}), .LB({lb}), .D({depth}), .AB({ab})) buf2 (.clk(clk),",
      "    .hw_en(1'b0), .hw_addr(host_addr), .hw_data({AW{1'b0}}), .hr_addr(host_raddr), .hr_data(host_rdata),",
      "    .v_base(base2), .v_we(we2), .v_mask(mask2), .v_wdata(wlanes2), .v_rdata(lanes2));",
  ]
  if os_:
    fetch = max(_cdiv(r, b), _cdiv(c, b))
    flush = r + c - 2 if systolic else 0
    wb = _cdiv(r * c, b)
    body = [
        f"  // operand 0 = A columns of row tile t0, operand 1 = B rows of column tile t1; outputs tile-major",
        f"  assign base0 = (t0 * {w.k} + k) * {r} + p * {b};",
        f"  assign base1 = (t1 * {w.k} + k) * {c} + p * {b};",
        f"  assign base2 = (t0 * {t1n} + t1) * {r * c} + p * {b};",
        *_stage("sa", r, b, "DW", "(state == S_FETCH)", "lanes0"),
        *_stage("sb", c, b, "DW", "(state == S_FETCH)", "lanes1"),
        f"  wire [{r * c}*AW-1:0] acc_flat;",
        "  wire flushing = (state == S_FLUSH);",
        "  gemm_array #(.DW(DW), .AW(AW)) array (.clk(clk), .clr(state == S_INIT),",
        "    .en(state == S_MAC || flushing),",
        f"    .a_vec(flushing ? {{({r}*DW){{1'b0}}}} : sa_flat), .b_vec(flushing ? {{({c}*DW){{1'b0}}}} : sb_flat),",
        "    .acc_flat(acc_flat));",
        "  assign we2 = (state == S_WB);",
        *_lane_mux("acc_flat", r * c, b, wb, ""),
        *_fsm("S_FETCH", [
            f"      S_FETCH: if (p == {fetch - 1}) begin p <= 0; state <= S_MAC; end else p <= p + 1;",
            f"      S_MAC: if (k == {w.k - 1}) begin k <= 0; p <= 0; state <= {'S_FLUSH' if flush else 'S_WB'}; end",
            "             else begin k <= k + 1; state <= S_FETCH; end",
            f"      S_FLUSH: if (p == {max(flush, 1) - 1}) begin p <= 0; state <= S_WB; end else p <= p + 1;",
            f"      S_WB: if (p == {wb - 1}) begin",
            "              p <= 0;",
            *_next_tile(t0n, t1n, " " * 14),
            "            end else p <= p + 1;",
        ]),
    ]
  else:
    pre = _cdiv(r * c, b)
    sf = _cdiv(r, b)
    sw = _cdiv(c, b)
    beat = max(sf, sw)  # systolic: one streamed vector a beat
    lat = r + c - 1 if systolic else 0  # beats from a vector entering the array to its sums leaving it
    if systolic:
      # Input lane g: its staging register, except in the sub-vector fetched in the beat's last cycle (the one
      # the array takes), which comes straight from the buffer's lanes.
      a_vec, enable, write = "a_next", f"state == S_FETCH && p == {beat - 1}", f"(state == S_FETCH) && (k >= {lat})"
      a_in = ", ".join(f"lanes0[{g % b}*DW +: DW]" if g // b == beat - 1 else f"sa[{g}]" for g in reversed(range(r)))
      body = [
          f"  // Pipelined: beat k (of {beat} cycle(s)) fetches streamed vector k while the write port stores the",
          f"  // sums of vector k - {lat}, which left the array at the previous beat; the array advances in a beat's",
          "  // last cycle.",
      ]
    else:
      a_vec, enable, write = "sa_flat", "1'b0", "(state == S_SWRITE)"
      body = []
    body += [
        "  // t0 = output tile, t1 = reduction (k) tile, k = streamed step; operand 1 = stationary tiles (tile-major),",
        "  // operand 0 = streamed vectors, outputs accumulated over reduction tiles (read-modify-write)",
        f"  assign base0 = (t1 * {time} + k) * {r} + p * {b};",
        f"  assign base1 = (t0 * {t1n} + t1) * {r * c} + p * {b};",
        f"  assign base2 = (t0 * {time} + k{f' - {lat}' if lat else ''}) * {c} + p * {b};",
        *_stage("ws", r * c, b, "DW", "(state == S_PRE)", "lanes1"),
        *_stage("sa", r, b, "DW", "(state == S_FETCH)", "lanes0"),
        *([f"  wire [{r}*DW-1:0] a_next = {{{a_in}}};"] if systolic else []),
        f"  wire [{c}*AW-1:0] psum;",
        f"  gemm_array #(.DW(DW), .AW(AW)) array (.clk(clk), .en({enable}),",
        f"    .a_vec({a_vec}), .w_flat(ws_flat), .psum(psum));",
        f"  assign we2 = {write};",
        *_lane_mux("psum", c, b, sw, "(t1 == 0 ? {AW{1'b0}} : lanes2[LANE*AW +: AW]) + "),
    ]
    if systolic:
      states = [
          f"      S_FETCH: if (p == {beat - 1}) begin",
          "              p <= 0;",
          f"              if (k == {time + lat - 1}) begin",
          "                k <= 0;",
          *_next_tile(t0n, t1n, " " * 16),
          "              end else k <= k + 1;",
          "            end else p <= p + 1;",
      ]
    else:
      states = [
          f"      S_FETCH: if (p == {sf - 1}) begin p <= 0; state <= S_SWRITE; end else p <= p + 1;",
          f"      S_SWRITE: if (p == {sw - 1}) begin",
          "              p <= 0;",
          f"              if (k == {time - 1}) begin",
          "                k <= 0;",
          *_next_tile(t0n, t1n, " " * 16),
          "              end else begin k <= k + 1; state <= S_FETCH; end",
          "            end else p <= p + 1;",
      ]
    body += _fsm("S_PRE", [f"      S_PRE: if (p == {pre - 1}) begin p <= 0; state <= S_FETCH; end else p <= p + 1;",
                           *states])
  return "\n".join(head + body + ["endmodule", ""])


def modules(design: Design, w: Workload) -> dict[str, str]:
  """{module name: Verilog} of the four template modules."""
  errs = problems(design, w)
  if errs:
    raise ValueError("; ".join(errs))
  os_ = design.dataflow == "os"
  return {"gemm_buffer": BUFFER, "gemm_pe": PE_OS if os_ else PE_ST,
          "gemm_array": _array_os(design) if os_ else _array_st(design), "gemm_accel": _top(design, w)}


def generate(design: Design, w: Workload, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
  """{file name: Verilog} of the accelerator; `overrides` replaces template modules by name (model-written code)."""
  mods = modules(design, w)
  for name, code in (overrides or {}).items():
    if name not in mods:
      raise ValueError(f"override {name!r} is not a template module; the modules are {list(mods)}")
    mods[name] = code
  return {f"{name}.v": code for name, code in mods.items()}


def testbench(design: Design, w: Workload, max_cycles: int | None = None) -> str:
  """A self-checking testbench: loads random A and B through the host port, runs, checks every C entry against
  the golden product computed here (numpy), prints `CYCLES: n` and VerilogEval's `Mismatches: N in M samples`."""
  a, b = w.matrices()
  golden = a @ b
  op0, op1, out = layout(design, w, a, b)
  ab = _clog2(design.banks * design.buf_depth)
  limit = max_cycles or 4 * analytic_cycles(design, w) + 100
  lines = [
      "`timescale 1ns/1ps",
      "module tb;",
      "  reg clk = 0, rst = 1, start = 0, host_we = 0;",
      "  reg [1:0] host_sel = 0;",
      f"  reg [{ab - 1}:0] host_addr = 0, host_raddr = 0;",
      "  reg [31:0] host_wdata = 0;",
      f"  wire [{w.acc_width - 1}:0] host_rdata;",
      "  wire done;",
      "  integer cycles, mismatches, samples;",
      "  gemm_accel dut (.clk(clk), .rst(rst), .start(start), .done(done), .host_we(host_we), .host_sel(host_sel),",
      "    .host_addr(host_addr), .host_wdata(host_wdata), .host_raddr(host_raddr), .host_rdata(host_rdata));",
      "  always #5 clk = ~clk;",
      "  task put(input [1:0] sel, input integer addr, input integer value);",
      "    begin @(negedge clk); host_we = 1; host_sel = sel; host_addr = addr; host_wdata = value; end",
      "  endtask",
      "  task check(input integer addr, input integer expected);",
      "    begin",
      "      host_raddr = addr; #1;",
      "      samples = samples + 1;",
      "      if (host_rdata !== expected) mismatches = mismatches + 1;",
      "    end",
      "  endtask",
      "  initial begin",
      "    mismatches = 0; samples = 0; cycles = 0;",
      "    @(negedge clk); @(negedge clk); rst = 0;",
  ]
  lines += [f"    put(0, {addr}, {v});" for addr, v in sorted(op0.items())]
  lines += [f"    put(1, {addr}, {v});" for addr, v in sorted(op1.items())]
  lines += [
      "    @(negedge clk); host_we = 0; start = 1;",
      "    @(negedge clk); start = 0;",
      f"    while (!done && cycles < {limit}) begin @(negedge clk); cycles = cycles + 1; end",
      "    if (!done) begin $display(\"TIMEOUT\"); $finish; end",
      "    $display(\"CYCLES: %0d\", cycles);",
  ]
  lines += [f"    check({out[(i, j)]}, {int(golden[i, j])});" for i in range(w.m) for j in range(w.n)]
  lines += [
      "    $display(\"Mismatches: %0d in %0d samples\", mismatches, samples);",
      "    $finish;",
      "  end",
      "endmodule",
      "",
  ]
  return "\n".join(lines)


def design_hash(sources: Mapping[str, str], design: Design, w: Workload) -> str:
  """The cache key of one evaluation: the exact sources (overrides included), knobs, workload and template."""
  h = hashlib.sha256()
  h.update(json.dumps({"design": design.to_json(), "workload": w.to_json(), "template": TEMPLATE_VERSION},
                      sort_keys=True).encode())
  for name in sorted(sources):
    h.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
  return h.hexdigest()[:20]
