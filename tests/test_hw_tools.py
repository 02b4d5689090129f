"""EDA tools in the sandbox: each failure class of the taxonomy from a planted design, verilator, yosys, g++, XLS."""

import random

from absl.testing import absltest
from absl.testing import parameterized

from lacax.hw import sandbox
from lacax.hw import tools
from lacax.hw.tools import cxx, iverilog, sim, verilator, xls, yosys

REF = "module RefModule(input a, input b, output y); assign y = a & b; endmodule\n"
TB = """`timescale 1 ps/1 ps
module tb;
  reg a, b; wire y_ref, y_dut; integer errors = 0, clocks = 0, i;
  RefModule ref0(.a(a), .b(b), .y(y_ref));
  TopModule dut(.a(a), .b(b), .y(y_dut));
  initial begin
    for (i = 0; i < 16; i = i + 1) begin
      {a, b} = i; #1;
      clocks = clocks + 1; if (y_ref !== y_dut) errors = errors + 1;
    end
    $display("Hint: Output '%s' has %0d mismatches.", "y", errors);
    $display("Mismatches: %1d in %1d samples", errors, clocks);
    $finish;
  end
endmodule
"""


def top(body):
  return f"module TopModule(input a, input b, output y);\n{body}\nendmodule\n"


PLANTED = {  # (category, detail prefix): a design that produces it
    ("pass", ""): top("assign y = a & b;"),
    ("syntax_error", "design.sv:3: syntax error"): top("assign y = a & b"),
    ("elaboration_error", "unknown_module"): top("and_gate g(.a(a), .b(b), .y(y));"),
    ("elaboration_error", "binding"): top("assign y = a & c;"),
    ("elaboration_error", "reg_wire"): top("always @* y = a & b;"),
    ("timeout", "wall_time"): top("assign y = a & b;\ninitial begin #1; forever begin end end"),
    ("runtime_error", "exit 1: FATAL"): top("assign y = a & b;\ninitial $fatal(1, \"boom\");"),
    ("mismatch", "8 of 16 samples (outputs: y)"): top("assign y = a | b;"),
    ("resource_limit", "output"): top("assign y = a & b;\ninitial forever $display(\"flood\");"),
}


class TaxonomyTest(parameterized.TestCase):

  @parameterized.parameters(*PLANTED.items())
  def test_planted_design(self, expected, design):
    category, detail = expected
    res = iverilog.simulate({"tb.sv": TB, "ref.sv": REF, "design.sv": design},
                            limits=sandbox.Limits(wall_s=3.0, output_bytes=1 << 16))
    self.assertEqual(res.category, category, res.compile.stderr + (res.run.stdout[:500] if res.run else ""))
    self.assertTrue(res.detail.startswith(detail), res.detail)
    self.assertEqual(res.versions["iverilog"], tools.versions()["iverilog"])
    self.assertEqual(res.passed, category == "pass")

  def test_every_category_is_planted(self):
    self.assertEqual({c for c, _ in PLANTED}, set(sim.CATEGORIES))

  def test_strict_stderr_fails_on_a_warning(self):
    # An implicit-net warning (-Wall): v2's rule passes it, v1's empty-stderr rule does not.
    design = top("assign t = a & b;\nassign y = t;")
    sources = {"tb.sv": TB, "ref.sv": REF, "design.sv": design}
    self.assertEqual(iverilog.simulate(sources).category, "pass")
    self.assertNotEqual(iverilog.simulate(sources, strict_stderr=True).category, "pass")

  def test_judges(self):
    self.assertEqual(sim.judge_mismatches("Mismatches: 0 in 20 samples").passed, True)
    self.assertEqual(sim.judge_mismatches("Mismatches: 0 in 0 samples").passed, False)
    v = sim.judge_mismatches("Hint: Output 'q' has 3 mismatches.\nMismatches: 3 in 20 samples")
    self.assertEqual((v.passed, v.mismatches, v.samples, v.outputs), (False, 3, 20, ("q",)))
    self.assertIsNone(sim.judge_mismatches("nothing").passed)
    # RTLLM: a pass banner after failure lines is a failure (ring_counter's testbench prints both).
    self.assertEqual(sim.judge_pass_marker("Failed at i=3\n=== Your Design Passed ===").passed, False)
    self.assertEqual(sim.judge_pass_marker("=== Your Design Passed ===").passed, True)
    self.assertEqual(sim.judge_pass_marker("=== Test completed with 0 /100 failures ===\nPassed").passed, True)
    self.assertEqual(sim.judge_pass_marker("=== Test completed with 4 failures ===").passed, False)
    self.assertIsNone(sim.judge_pass_marker("done").passed)
    # logikbench: zero counts and PASS lines that mention errors are not failures; a non-zero count is.
    ok = "PASS [a5 single] single-error corrected\n errors = 0 (after 6 tests)\n PASSED"
    self.assertEqual(sim.judge_pass_marker(ok).passed, True)
    self.assertEqual(sim.judge_pass_marker("0 errors\nPASSED").passed, True)
    self.assertEqual(sim.judge_pass_marker(" errors = 3 (after 6 tests)\n PASSED").passed, False)
    self.assertEqual(sim.judge_pass_marker("ERROR: x mismatch\nPASSED").passed, False)


class VerilatorTest(absltest.TestCase):

  def test_binary_simulation_agrees_with_iverilog(self):
    # One C++ build (seconds each): a ^ b differs from a & b on 3 of 4 inputs, 12 of 16 samples in both.
    sources = {"tb.sv": TB, "ref.sv": REF, "design.sv": top("assign y = a ^ b;")}
    res = verilator.simulate(sources)
    self.assertEqual(res.simulator, "verilator")
    self.assertEqual(res.category, "mismatch", res.compile.stderr[-2000:])
    self.assertEqual((res.verdict.mismatches, res.verdict.samples), (12, 16))
    self.assertEqual(iverilog.simulate(sources).verdict, res.verdict)

  def test_lint(self):
    clean = verilator.lint({"d.v": "module d(input a, output y); assign y = ~a; endmodule\n"}, top="d")
    self.assertTrue(clean.ok)
    broken = verilator.lint({"d.v": "module d(input a, output y); assign y = ~b; endmodule\n"}, top="d")
    self.assertFalse(broken.ok)
    self.assertTrue(any("b" in msg for _, msg in broken.errors), broken.errors)


class YosysTest(absltest.TestCase):

  def test_area_and_depth_proxies(self):
    reg = {"a.v": "module add(input clk, input [7:0] a, b, output reg [8:0] s);\n"
                  "always @(posedge clk) s <= a + b;\nendmodule\n"}
    comb8 = {"a.v": "module add(input [7:0] a, b, output [8:0] s); assign s = a + b; endmodule\n"}
    comb16 = {"a.v": "module add(input [15:0] a, b, output [16:0] s); assign s = a + b; endmodule\n"}
    r, c8, c16 = (yosys.synthesize(s, "add") for s in (reg, comb8, comb16))
    self.assertTrue(r.ok and c8.ok and c16.ok, r.error + c8.error + c16.error)
    self.assertEqual(r.flip_flops, 9)  # one flip-flop per registered sum bit
    self.assertEqual(c8.flip_flops, 0)
    self.assertEqual(sum(r.cell_types.values()), r.cells)
    self.assertGreater(c16.cells, c8.cells)  # wider adder: more area
    self.assertGreater(c16.depth, c8.depth)  # and a longer ripple path
    self.assertGreater(c8.depth, 1)

  def test_error_reported(self):
    res = yosys.synthesize({"a.v": "module add(input a, output y); assign y = a &; endmodule\n"}, "add")
    self.assertFalse(res.ok)
    self.assertIn("syntax error", res.error)


class CxxTest(absltest.TestCase):

  def test_compile_and_run(self):
    res = cxx.compile_and_run({"m.cpp": "#include <iostream>\nint main(){int x; std::cin >> x; "
                                        "std::cout << x * x << std::endl;}\n"}, stdin="12\n")
    self.assertEqual((res.category, res.stdout), ("ok", "144\n"))
    self.assertEqual(cxx.compile_and_run({"m.cpp": "int main( {"}).category, "compile_error")
    self.assertEqual(cxx.compile_and_run({"m.cpp": "int main(){ return 4; }"}).category, "runtime_error")
    spin = cxx.compile_and_run({"m.cpp": "int main(){ volatile int x = 0; for (;;) x++; }"},
                               run_limits=sandbox.Limits(wall_s=1.0))
    self.assertEqual(spin.category, "timeout")


class XlsTest(absltest.TestCase):

  DSLX = "pub fn mac(a: u8, b: u8, acc: u16) -> u16 { acc + (a as u16) * (b as u16) }\n"

  def test_pipelined_verilog_matches_the_interpreter(self):
    res = xls.dslx_to_verilog(self.DSLX, "mac", pipeline_stages=2)
    self.assertTrue(res.ok, res.error)
    self.assertIn("module mac(", res.verilog)
    self.assertIn("posedge clk", res.verilog)
    rng = random.Random(0)
    vecs = [(rng.randrange(256), rng.randrange(256), rng.randrange(1 << 16)) for _ in range(20)]
    interp = xls.interpret(self.DSLX, "mac", [[f"bits[8]:{a}", f"bits[8]:{b}", f"bits[16]:{c}"] for a, b, c in vecs])
    self.assertTrue(interp.ok, interp.error)
    want = [(c + a * b) % (1 << 16) for a, b, c in vecs]
    self.assertEqual(interp.results, tuple(f"bits[16]:{w}" for w in want))
    # Two stages = one register level: the output for inputs applied before edge t appears after edge t.
    checks = "\n".join(f"    a = {a}; b = {b}; acc = {c}; @(posedge clk); #1; "
                       f"if (out !== 16'd{w}) errors = errors + 1; n = n + 1;" for (a, b, c), w in zip(vecs, want))
    tb = ("module tb; reg clk = 0; always #5 clk = ~clk; reg [7:0] a, b; reg [15:0] acc; wire [15:0] out;\n"
          "  integer errors = 0, n = 0;\n  mac dut(.clk(clk), .a(a), .b(b), .acc(acc), .out(out));\n"
          f"  initial begin\n{checks}\n    $display(\"Mismatches: %1d in %1d samples\", errors, n); $finish;\n"
          "  end\nendmodule\n")
    simres = iverilog.simulate({"tb.v": tb, "mac.v": res.verilog})
    self.assertEqual(simres.category, "pass", simres.detail)
    self.assertEqual(simres.verdict.samples, 20)

  def test_dslx_error_is_reported_not_raised(self):
    res = xls.dslx_to_verilog("pub fn f(a: u8) -> u8 { a + }", "f")
    self.assertFalse(res.ok)
    self.assertEqual(res.stage, "dslx_to_ir")
    self.assertIn("ParseError", res.error)


if __name__ == "__main__":
  absltest.main()
