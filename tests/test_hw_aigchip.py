"""GPT4AIGChip: the GEMM template (simulated and synthesised for real), the analytic cycle model, the auto-fixer,
the demo selectors and the search's guarantees (failed designs never fit, reproducible at equal budgets and seeds)."""

import importlib.util
import itertools
import shutil

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from lacax.hw.aigchip import ablation
from lacax.hw.aigchip import autofix
from lacax.hw.aigchip import demos
from lacax.hw.aigchip import evaluate
from lacax.hw.aigchip import hls
from lacax.hw.aigchip import search
from lacax.hw.aigchip import template
from lacax.hw.backends.scripted import ScriptedBackend
from lacax.hw.tools import iverilog

_TOOLS = all(shutil.which(t) for t in ("iverilog", "vvp", "yosys"))
_XLS = importlib.util.find_spec("xls") is not None
W_SMALL = template.Workload(m=4, k=4, n=4, width=2, seed=3)


def _sim(design, workload=W_SMALL, overrides=None):
  return evaluate.evaluate(design, workload, overrides, synth=False)


@absltest.skipUnless(_TOOLS, "needs iverilog and yosys")
class TemplateTest(parameterized.TestCase):

  def test_default_knobs_pass_the_gemm_testbench_and_synthesise(self):
    rec = evaluate.evaluate(template.Design(), template.Workload(m=4, k=4, n=4, width=4))
    self.assertTrue(rec["ok"], rec)
    self.assertEqual(rec["category"], "pass")
    self.assertEqual(rec["cycles"], rec["analytic_cycles"])
    self.assertGreater(rec["cells"], 100)
    self.assertGreater(rec["flip_flops"], 0)
    self.assertAlmostEqual(rec["fitness"], evaluate.fitness_of(rec["cycles"], rec["cells"], 1.0))

  @parameterized.parameters(*itertools.product(template.DATAFLOWS, template.INTERCONNECTS))
  def test_simulated_cycles_equal_the_analytic_count(self, dataflow, interconnect):
    # (rows, cols, banks): a square array, a tall one whose vectors need partial sub-vectors, one bank.
    # (4, 2, 2): a systolic beat whose last cycle fetches a sub-vector straight into the array; (1, 4, 1): one
    # whose write port needs every cycle of it.
    for rows, cols, banks in ((2, 2, 2), (4, 2, 4), (1, 4, 1), (4, 2, 2)):
      d = template.Design(rows=rows, cols=cols, interconnect=interconnect, buf_depth=16, banks=banks,
                          dataflow=dataflow)
      rec = _sim(d)
      self.assertEqual(rec["category"], "pass", (d, rec["detail"]))
      self.assertEqual(rec["cycles"], template.analytic_cycles(d, W_SMALL), d)

  def test_a_wrong_pe_is_caught_by_the_golden_product(self):
    wrong = template.PE_OS.replace("acc + a_in * b_in", "acc + a_in + b_in")
    rec = _sim(template.Design(), overrides={"gemm_pe": wrong})
    self.assertEqual(rec["category"], "mismatch")
    self.assertFalse(rec["ok"])
    self.assertIsNone(rec["fitness"])


@absltest.skipUnless(_TOOLS and _XLS, "needs iverilog, yosys and xls-python")
class DslxPeTest(absltest.TestCase):
  """The PE's multiply-accumulate in DSLX, built by XLS, drops into the template: the GEMM passes, in the
  template's cycles, and synthesises."""

  def test_the_xls_built_pe_passes_the_gemm_and_synthesises(self):
    w = template.Workload(m=4, k=4, n=4, width=3, seed=1)
    evaluator = evaluate.Evaluator(w, pe="dslx")
    for d in (template.Design(), template.Design(dataflow="ws", interconnect="systolic")):
      rec = evaluator(d)
      self.assertTrue(rec["ok"], (d, rec["detail"]))
      self.assertEqual(rec["cycles"], template.analytic_cycles(d, w))
      self.assertEqual(rec["overrides"], ["gemm_pe"])
      self.assertEqual(rec["fixes"], [])
      self.assertGreater(rec["cells"], 100)
      code = hls.pe_module(d, w)
      self.assertIn("module gemm_pe_mac(", code)  # XLS's module, inside the template's wrapper
      self.assertIn(f"uN[{w.acc_width}]", hls.pe_dslx(d, w))
    with self.assertRaisesRegex(ValueError, "pe='hls' must be one of"):
      evaluate.Evaluator(w, pe="hls")


class TemplateModelTest(absltest.TestCase):

  def test_infeasible_designs_name_the_knob_and_the_constraint(self):
    w = template.Workload(m=8, k=8, n=8)
    errs = template.problems(template.Design(buf_depth=8, banks=4), w)
    self.assertTrue(any("banks * design.buf_depth = 32" in e and "64 words" in e for e in errs), errs)
    errs = template.problems(template.Design(rows=16, dataflow="ws", buf_depth=64), w)
    self.assertTrue(any("design.rows=16 must divide workload.k=8" in e for e in errs), errs)
    errs = template.problems(template.Design(rows=3), w)
    self.assertTrue(any("design.rows=3 must be one of" in e for e in errs), errs)
    rec = evaluate.evaluate(template.Design(buf_depth=8, banks=4), w)
    self.assertEqual((rec["stage"], rec["ok"], rec["fitness"]), ("validate", False, None))

  def test_from_json_names_bad_knobs(self):
    with self.assertRaisesRegex(ValueError, r"unknown knob\(s\) \['size'\]"):
      template.Design.from_json({"size": 4})
    with self.assertRaisesRegex(ValueError, r"design.rows='four' must be an integer"):
      template.Design.from_json({"rows": "four"})
    self.assertEqual(template.Design.from_json({"rows": 4.0, "dataflow": " WS "}),
                     template.Design(rows=4, dataflow="ws"))

  def test_analytic_model_properties(self):
    w = template.Workload(m=8, k=8, n=8)
    for df, ic in itertools.product(template.DATAFLOWS, template.INTERCONNECTS):
      cycles = [template.analytic_cycles(template.Design(rows=4, cols=4, banks=b, buf_depth=64, dataflow=df,
                                                         interconnect=ic), w) for b in (1, 2, 4)]
      self.assertEqual(cycles, sorted(cycles, reverse=True), (df, ic))  # more banks never costs cycles
    # Systolic weight- / input-stationary arrays are pipelined: per tile, one streamed vector a beat after a fill
    # of rows + cols - 1 beats (4 x 4 PEs, 4 banks: a beat is one cycle), so 8 more rows of A cost 8 beats a tile.
    for df in ("ws", "is"):
      d = template.Design(rows=4, cols=4, banks=4, buf_depth=64, dataflow=df, interconnect="systolic")
      self.assertEqual(template.analytic_cycles(d, w), 4 * (1 + 4 + 8 + 7))
    d = template.Design(rows=4, cols=4, banks=4, buf_depth=64, dataflow="ws", interconnect="systolic")
    self.assertEqual(template.analytic_cycles(d, template.Workload(m=16, k=8, n=8)) - template.analytic_cycles(d, w),
                     4 * 8)
    # Output-stationary, broadcast, one PE: K * (fetch + MAC) + write-back per output, one init each.
    self.assertEqual(template.analytic_cycles(template.Design(rows=1, cols=1, banks=1, buf_depth=64), w),
                     64 * (1 + 8 * 2 + 1))


@absltest.skipUnless(_TOOLS, "needs iverilog")
class AutofixTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    d = template.Design()
    cls.design = d
    cls.context = {"tb.v": template.testbench(d, W_SMALL),
                   **{k: v for k, v in template.generate(d, W_SMALL).items() if k != "gemm_pe.v"}}

  @parameterized.named_parameters(
      ("prose_and_fences", lambda c: "Sure! Here it is:\n```verilog\n" + c + "```\nIt is a MAC.", "extract"),
      ("missing_endmodule", lambda c: c.replace("endmodule", ""), "missing_endmodule"),
      ("wrong_module_name", lambda c: c.replace("module gemm_pe", "module mac_unit"), "module_name"),
      ("wire_assigned_in_always", lambda c: c.replace("output reg [AW-1:0] acc", "output [AW-1:0] acc"),
       "wire_to_reg"),
      ("undeclared_identifier", lambda c: c.replace("acc <= acc + a_in * b_in;", "acc <= acc + prod;").replace(
          "  generate", "  always @(*) prod = a_in * b_in;\n  generate"), "undeclared"),
  )
  def test_planted_error_is_fixed(self, plant, rule):
    broken = plant(template.PE_OS)
    ok, _ = iverilog.compiles({**self.context, "gemm_pe.v": broken}, top="tb")
    if rule != "extract":
      self.assertFalse(ok)
    code, fixes, compiles, messages = autofix.fix_loop(broken, "gemm_pe", self.context)
    self.assertTrue(compiles, messages)
    self.assertIn(rule, [f.rule for f in fixes])
    self.assertEqual(_sim(self.design, overrides={"gemm_pe": code})["category"], "pass")

  def test_ablation_cell_scores_compile_functional_and_fixed(self):
    good = "```verilog\n" + template.PE_OS + "```"
    answers = [good, good.replace("endmodule", ""), good.replace("a_in * b_in", "a_in - b_in")]
    backend = ScriptedBackend(sequence=answers)
    cell = ablation.run_cell(backend, "bm25", 1, "os", W_SMALL, demos.load_library(),
                             demos.base.Sampling(n=3, max_tokens=400))
    self.assertEqual(cell["demos"], ["os_mac_pe"])
    self.assertEqual((cell["compile_c"], cell["functional_c"], cell["fixed_c"]), (2, 1, 2))
    self.assertAlmostEqual(cell["compile@1"], 2 / 3)
    # The :cpu workload (8x8x8) outgrows the targets' default buffers (2 x 16 words): they are deepened to fit.
    w = template.Workload(m=8, k=8, n=8, width=4)
    cell = ablation.run_cell(ScriptedBackend(sequence=[good]), "none", 0, "os", w, demos.load_library(),
                             demos.base.Sampling(n=1, max_tokens=400))
    self.assertEqual(cell["functional_c"], 1)
    self.assertEqual(ablation.target_design("ws", w).buf_depth, 32)
    with self.assertRaisesRegex(ValueError, "ablation target 'os' .* cannot run workload .*design.rows=2 must divide"):
      ablation.target_design("os", template.Workload(m=3, k=4, n=4))

  def test_parse_errors_reads_iverilog_messages(self):
    msgs = ("x.v:9: error: Unable to bind wire/reg/memory `prod' in `tb.dut'\n"
            "x.v:8: error: acc is not a valid l-value in tb.dut.pe.\nx.v:15: error: Unknown module type: gemm_pe\n")
    self.assertEqual(autofix.parse_errors(msgs),
                     [("module_name", "gemm_pe"), ("undeclared", "prod"), ("wire_to_reg", "acc")])


class _Embedder:
  capabilities = frozenset({"embeddings"})

  def __init__(self, vectors):
    self.vectors = vectors

  def embed(self, texts):
    return np.array([self.vectors.get(t, [0.0, 0.0, 1.0]) for t in texts])

  def describe(self):
    return {"kind": "fake_embedder"}


class DemosTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.lib = [demos.Demo("mac", "pe", "multiply accumulate processing element with accumulator", "module a; endmodule"),
               demos.Demo("fifo", "buffer", "first in first out queue buffer", "module b; endmodule"),
               demos.Demo("uart", "other", "serial uart transmitter with start bit", "module c; endmodule"),
               demos.Demo("sys", "pe", "systolic processing element forwarding operands and accumulator",
                          "module d; endmodule")]
    cls.query = "output-stationary processing element: multiply accumulate into an accumulator"

  def test_shipped_library_loads_and_every_demo_compiles(self):
    lib = demos.load_library()
    self.assertGreaterEqual(len(lib), 8)
    self.assertEqual(len({d.id for d in lib}), len(lib))
    if shutil.which("iverilog"):
      for d in lib:
        ok, res = iverilog.compiles({f"{d.id}.v": d.code})
        self.assertTrue(ok, (d.id, res.stderr))

  def test_bm25_dissimilar_none_random(self):
    ids = lambda ds: [d.id for d in ds]
    self.assertEqual(ids(demos.select("bm25", self.query, self.lib, 2)[0]), ["mac", "sys"])
    self.assertEqual(ids(demos.select("dissimilar", self.query, self.lib, 2)[0]), ["fifo", "uart"])
    self.assertEqual(demos.select("none", self.query, self.lib, 2)[0], [])
    r0 = ids(demos.select("random", self.query, self.lib, 2, seed=0)[0])
    self.assertEqual(r0, ids(demos.select("random", self.query, self.lib, 2, seed=0)[0]))
    self.assertLen(set(r0), 2)
    draws = {tuple(ids(demos.select("random", self.query, self.lib, 2, seed=s)[0])) for s in range(8)}
    self.assertGreater(len(draws), 1)

  def test_embedding_ranks_by_cosine(self):
    vec = {self.query: [1.0, 0.0, 0.0], self.lib[0].instruction: [0.0, 1.0, 0.0],
           self.lib[1].instruction: [0.9, 0.1, 0.0], self.lib[2].instruction: [0.5, 0.5, 0.0],
           self.lib[3].instruction: [-1.0, 0.0, 0.0]}
    chosen, info = demos.select("embedding", self.query, self.lib, 2, backend=_Embedder(vec))
    self.assertEqual([d.id for d in chosen], ["fifo", "uart"])
    self.assertGreater(info["scores"][0], info["scores"][1])
    with self.assertRaisesRegex(ValueError, "does not provide 'embeddings'"):
      demos.select("embedding", self.query, self.lib, 2, backend=ScriptedBackend(default=lambda p, j: ""))

  def test_llm_selector_takes_the_backends_pick_and_fills_a_bad_answer(self):
    prompt = demos.llm_prompt(self.query, self.lib, 2)
    backend = ScriptedBackend(responses={"": ["-"]}, default=lambda p, j: "Examples 3 and 1.")
    chosen, info = demos.select("llm", self.query, self.lib, 2, backend=backend)
    self.assertEqual([d.id for d in chosen], ["uart", "mac"])
    self.assertNotIn("fallback", info)
    self.assertEqual(backend.calls[0][0][0], prompt)
    bad = ScriptedBackend(default=lambda p, j: "number 9, then 3, 3 again")
    chosen, info = demos.select("llm", self.query, self.lib, 2, backend=bad)
    self.assertEqual([d.id for d in chosen], ["uart", "mac"])  # 9 is outside, the repeat dropped, bm25 fills
    self.assertEqual(info["fallback"], 1)

  def test_prompt_builder_holds_the_demos_then_the_task(self):
    msgs = demos.build_prompt("write a PE", self.lib[:2], interface="module gemm_pe(input clk);")
    user = msgs[-1]["content"]
    self.assertLess(user.index(self.lib[0].instruction), user.index(self.lib[1].instruction))
    self.assertLess(user.index("module b; endmodule"), user.index("Instruction: write a PE"))
    self.assertIn("module gemm_pe(input clk);", user)


def _fake_evaluator(bad):
  """A deterministic stand-in: fitness from the analytic cycles and a made-up area; `bad` designs "fail
  simulation" although they would have the best fitness of all."""
  w = template.Workload(m=8, k=8, n=8)
  calls = []

  def ev(design, overrides=None):
    calls.append(design)
    errs = template.problems(design, w)
    if errs:
      return {"design": design.to_json(), "ok": False, "category": "infeasible", "fitness": None}
    cyc = template.analytic_cycles(design, w)
    cells = 100 * design.rows * design.cols + 10 * design.banks * design.buf_depth
    if bad(design):
      return {"design": design.to_json(), "ok": False, "category": "mismatch", "cycles": cyc, "cells": 1,
              "fitness": None}
    return {"design": design.to_json(), "ok": True, "category": "pass", "cycles": cyc, "cells": cells,
            "fitness": evaluate.fitness_of(cyc, cells, 1.0)}

  ev.calls = calls
  return ev


class SearchTest(absltest.TestCase):

  space = search.check_space({"rows": (1, 2, 4, 8), "cols": (1, 2, 4, 8), "banks": (1, 2, 4, 8),
                              "buf_depth": (8, 16, 32, 64)})

  def test_failed_designs_are_never_fit_nor_best(self):
    bad = lambda d: d.rows * d.cols >= 16  # the big arrays "fail simulation"
    for proposer in (search.HeuristicProposer(self.space),
                     search.BackendProposer(ScriptedBackend(default=search.scripted_designer(self.space)),
                                            self.space, template.Workload(m=8, k=8, n=8))):
      hist = search.evolve(_fake_evaluator(bad), proposer, search.SearchConfig(budget=30, population=6, seed=1),
                           self.space)
      self.assertLen(hist, 30)
      failed = [r for r in hist if r["design"] and bad(template.Design.from_json(r["design"]))]
      self.assertNotEmpty(failed)
      self.assertTrue(all(not r["ok"] and r["fitness"] is None for r in failed))
      summary = search.summarize(hist)
      self.assertFalse(bad(template.Design.from_json(summary["best_design"])))
      self.assertTrue(all(not bad(template.Design.from_json(p["design"])) for p in search.pareto(hist)))

  def test_equal_budgets_and_seeds_reproduce(self):
    backend = lambda: ScriptedBackend(default=search.scripted_designer(self.space))
    runs = []
    for _ in range(2):
      prop = search.BackendProposer(backend(), self.space, template.Workload(m=8, k=8, n=8))
      runs.append(search.evolve(_fake_evaluator(lambda d: False), prop,
                                search.SearchConfig(budget=20, population=5, seed=7), self.space))
    self.assertEqual(runs[0], runs[1])
    other = search.evolve(_fake_evaluator(lambda d: False),
                          search.BackendProposer(backend(), self.space, template.Workload(m=8, k=8, n=8)),
                          search.SearchConfig(budget=20, population=5, seed=8), self.space)
    self.assertNotEqual([r["design"] for r in runs[0]], [r["design"] for r in other])
    rs = [search.random_search(_fake_evaluator(lambda d: False), search.SearchConfig(budget=20, population=5,
                                                                                     seed=7), self.space)
          for _ in range(2)]
    self.assertEqual(rs[0], rs[1])
    self.assertLen(rs[0], 20)
    # Both methods start from the same random designs at the same seed.
    self.assertEqual([r["design"] for r in rs[0][:5]], [r["design"] for r in runs[0][:5]])

  def test_unparseable_answers_spend_budget_and_are_not_fit(self):
    prop = search.BackendProposer(ScriptedBackend(default=lambda p, j: "a bigger array, I think"), self.space,
                                  template.Workload(m=8, k=8, n=8))
    hist = search.evolve(_fake_evaluator(lambda d: False), prop, search.SearchConfig(budget=8, population=3, seed=0),
                         self.space)
    self.assertLen(hist, 8)
    children = [r for r in hist if r["source"] == "child"]
    self.assertNotEmpty(children)
    self.assertTrue(all(r["category"] == "unparseable" and r["fitness"] is None for r in children))

  def test_parse_design_reads_the_first_knob_object(self):
    d, lenient = search.parse_design('Sure: {"note": 1} then {"rows": 4, "cols": 2, "dataflow": "ws"} done')
    self.assertEqual((d.rows, d.cols, d.dataflow, lenient), (4, 2, "ws", False))
    parent = template.Design(rows=8, cols=8, banks=8, buf_depth=64, dataflow="is")
    cut = '```json\n{\n  "rows": 1,\n  "cols": 2,\n  "rows": 2,\n  "interconnect": "systolic",\n  "ban'
    d, lenient = search.parse_design(cut, parent)  # cut off by max_tokens: the pairs, the rest from the parent
    self.assertEqual(d, template.Design(rows=2, cols=2, interconnect="systolic", banks=8, buf_depth=64,
                                        dataflow="is"))
    self.assertTrue(lenient)
    with self.assertRaisesRegex(ValueError, "no JSON object of knobs"):
      search.parse_design(cut, lenient=False)
    with self.assertRaisesRegex(ValueError, "no JSON object of knobs"):
      search.parse_design("rows=4")

  @absltest.skipUnless(_TOOLS, "needs iverilog")
  def test_code_mode_with_real_simulation_caches_by_hash(self):
    space = search.check_space({"rows": (1, 2), "cols": (1, 2), "banks": (2,), "buf_depth": (16,)})
    ev = evaluate.Evaluator(W_SMALL, synth=False)
    prop = search.BackendProposer(ScriptedBackend(default=search.scripted_designer(space)), space, W_SMALL,
                                  mode="code")
    hist = search.evolve(ev, prop, search.SearchConfig(budget=5, population=2, tournament=2, seed=0), space)
    children = [r for r in hist if r["source"] == "child"]
    self.assertTrue(all(r["ok"] for r in hist), [(r["category"], r["detail"]) for r in hist])
    self.assertTrue(any(f["rule"] == "missing_endmodule" for r in children for f in r["fixes"]))
    self.assertTrue(all(r["cycles"] == r["analytic_cycles"] for r in hist))
    before = ev.computed
    again = ev(template.Design.from_json(hist[0]["design"]))
    self.assertTrue(again["cached"])
    self.assertEqual(ev.computed, before)

  @absltest.skipUnless(_TOOLS, "needs iverilog")
  def test_shared_cache_dir_serves_another_run(self):
    import tempfile  # pylint: disable=g-import-not-at-top
    shared = tempfile.mkdtemp(prefix="lacax_aigchip_cache_")
    first = evaluate.Evaluator(W_SMALL, synth=False, run_dir=tempfile.mkdtemp(), cache_dir=shared)
    rec = first(template.Design())
    second = evaluate.Evaluator(W_SMALL, synth=False, run_dir=tempfile.mkdtemp(), cache_dir=shared)
    self.assertEqual(second(template.Design()), rec)
    self.assertEqual((first.computed, second.computed), (1, 0))


if __name__ == "__main__":
  absltest.main()
