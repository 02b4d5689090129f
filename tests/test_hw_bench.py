"""Benchmark harness: pass@k against the closed form, oracle = 100% and a wrong design = 0% on generated
problems, loaders on generated VerilogEval v2 / RTLLM folders, scripted / replay backends, JSONL results."""

import fractions
import json
import math
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from lacax.hw.backends import base
from lacax.hw.backends import oracle
from lacax.hw.backends import scripted
from lacax.hw.bench import harness, loaders, passk
from lacax.hw.bench import problem as problem_lib
from lacax.hw.mg_verilog import tasks as tasks_lib

# One task per family: combinational and sequential, FSM included.
TASKS = [tasks_lib.make_task("adder", {"width": 4}),
         tasks_lib.make_task("mux", {"inputs": 4, "width": 4}),
         tasks_lib.make_task("counter", {"width": 4, "up": True, "reset_value": 1}),
         tasks_lib.make_task("fsm_table", {"states": 3, "next": ((0, 1), (2, 0), (1, 2)), "out": (0, 1, 1)})]


class PassAtKTest(parameterized.TestCase):

  @parameterized.parameters(
      (5, 1, 1, fractions.Fraction(1, 5)),
      (10, 3, 5, 1 - fractions.Fraction(21, 252)),  # 1 - C(7,5)/C(10,5)
      (20, 0, 10, fractions.Fraction(0)),
      (20, 20, 1, fractions.Fraction(1)),
      (4, 1, 4, fractions.Fraction(1)),  # n - c < k: every k-subset holds the pass
      (6, 2, 3, 1 - fractions.Fraction(4, 20)),  # 1 - C(4,3)/C(6,3)
  )
  def test_closed_form(self, n, c, k, want):
    self.assertEqual(passk.pass_at_k_exact(n, c, k), want)
    self.assertAlmostEqual(passk.pass_at_k(n, c, k), float(want))

  def test_equals_subset_enumeration(self):
    # pass@k is the probability that a random k-subset of the n samples holds a pass.
    import itertools  # pylint: disable=g-import-not-at-top
    n, c = 7, 3
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(samples, k))
      want = fractions.Fraction(sum(any(s) for s in subsets), len(subsets))
      self.assertEqual(passk.pass_at_k_exact(n, c, k), want)

  def test_k_above_n_is_undefined_and_skipped(self):
    self.assertIsNone(passk.pass_at_k(3, 1, 5))
    self.assertEqual(passk.summary([(5, 1), (5, 5)], ks=(1, 5, 10)), {"pass@1": 0.6, "pass@5": 1.0})
    with self.assertRaisesRegex(ValueError, "0 <= c <= n"):
      passk.pass_at_k(3, 4, 1)


def _write_verilog_eval(root, tasks, task="spec-to-rtl"):
  folder = os.path.join(root, loaders.VERILOG_EVAL_TASKS[task])
  os.makedirs(folder)
  for i, t in enumerate(tasks):
    stem = os.path.join(folder, f"Prob{i + 1:03d}_{t.template}")
    ref = t.reference.replace("module TopModule", "module RefModule")
    with open(stem + "_prompt.txt", "w") as f:
      f.write(t.levels["detailed"] + "\n")
    with open(stem + "_ref.sv", "w") as f:
      f.write(ref)
    with open(stem + "_test.sv", "w") as f:
      f.write(t.testbench)
    if task == "code-complete":
      with open(stem + "_ifc.txt", "w") as f:
        f.write(t.interface + "\n")


def _write_rtllm(root, tasks):
  for t in tasks:
    name = t.template + "_design"
    folder = os.path.join(root, "Some Category", "Sub cat", name)  # RTLLM folder names hold spaces
    os.makedirs(folder)
    ref = t.reference.replace("module TopModule", f"module verified_{name}")
    tb = t.testbench.replace("RefModule good", f"ref_{name} good").replace("TopModule dut", f"{name} dut")
    tb = tb.replace('$display("Mismatches: %1d in %1d samples", errors, clocks);',
                    'if (errors == 0) $display("=== Your Design Passed ==="); '
                    'else $display("=== Test completed with %0d failures ===", errors);')
    tb += t.reference.replace("module TopModule", f"module ref_{name}")
    with open(os.path.join(folder, "design_description.txt"), "w") as f:
      f.write(f"Please act as a professional verilog designer.\n\n{t.levels['detailed']}\n\nModule name:\n"
              f"    {name}\n\nGive me the complete code.\n")
    with open(os.path.join(folder, "testbench.v"), "w") as f:
      f.write(tb)
    with open(os.path.join(folder, f"verified_{name}.v"), "w") as f:
      f.write(ref)
    with open(os.path.join(folder, "makefile"), "w") as f:
      f.write("vcs:\n\tvcs -sverilog +v2k testbench.v\n")
    with open(os.path.join(folder, "data.txt"), "w") as f:
      f.write("0\n1\n")


class HarnessTest(absltest.TestCase):

  def test_oracle_scores_100_percent_and_a_wrong_design_0(self):
    problems = [t.problem("detailed") for t in TASKS]
    rep = harness.evaluate(problems, oracle.OracleBackend(problems), base.Sampling(n=2), workers=2)
    self.assertEqual(rep.pass_at(1), 1.0)
    self.assertEqual(rep.categories(), {"pass": 8})
    wrong = scripted.ScriptedBackend(default=lambda prompt, j: "```verilog\nmodule TopModule(); endmodule\n```")
    rep = harness.evaluate(problems, wrong, base.Sampling(n=1), workers=2)
    self.assertEqual(rep.pass_at(1), 0.0)
    self.assertTrue(all(r.reason.startswith("elaboration_error: binding") for r in rep.results),
                    [r.reason for r in rep.results])

  def test_mutants_fail_with_a_mismatch_and_pass_at_k_mixes(self):
    problems = [t.problem("high_level") for t in TASKS]
    # Two samples per problem: the reference and the mutant, in that order.
    responses = {scripted.prompt_key(problem_lib.render_prompt(p)): [t.reference, t.mutant]
                 for p, t in zip(problems, TASKS)}
    rep = harness.evaluate(problems, scripted.ScriptedBackend(responses), base.Sampling(n=2), workers=2)
    for r in rep.results:
      self.assertEqual([s.category for s in r.samples], ["pass", "mismatch"])
      self.assertEqual((r.n, r.c), (2, 1))
    self.assertEqual(rep.pass_at(1), 0.5)
    self.assertEqual(rep.pass_at(2), 1.0)
    with tempfile.TemporaryDirectory() as d:
      jsonl, summ = rep.write(d, ks=(1, 2))
      with open(jsonl) as f:
        rows = [json.loads(l) for l in f]
      with open(summ) as f:
        summary = json.load(f)
    self.assertEqual([r["task_id"] for r in rows], [p.task_id for p in problems])
    self.assertEqual(rows[0]["categories"], ["pass", "mismatch"])
    self.assertEqual(rows[0]["pass@1"], 0.5)
    self.assertEqual(len(rows[0]["completions"]), 2)
    self.assertEqual(summary["pass@2"], 1.0)
    self.assertEqual(summary["sampling"]["n"], 2)
    self.assertIn("iverilog", summary["versions"])
    self.assertEqual(summary["isolation"]["mode"], "namespaces")

  def test_verilog_eval_loader_on_a_generated_folder(self):
    with tempfile.TemporaryDirectory() as root:
      _write_verilog_eval(root, TASKS[:2], "spec-to-rtl")
      _write_verilog_eval(root, TASKS[2:], "code-complete")
      spec = loaders.verilog_eval(root, "spec-to-rtl")
      cc = loaders.verilog_eval(root, "code-complete")
      self.assertEqual([p.task_id for p in spec], ["Prob001_adder", "Prob002_mux"])
      self.assertEqual([p.answer_mode for p in cc], ["body", "body"])
      self.assertTrue(cc[0].interface.startswith("module TopModule ("))
      self.assertNotIn("module", cc[0].reference_answer().split("\n")[0])
      for probs in (spec, cc):
        rep = harness.evaluate(probs, oracle.OracleBackend(probs), workers=2)
        self.assertEqual(rep.pass_at(1), 1.0, rep.failures())
      with self.assertRaisesRegex(FileNotFoundError, "_prompt.txt"):
        loaders.verilog_eval(os.path.join(root, "nowhere"))

  def test_rtllm_loader_on_a_generated_folder(self):
    with tempfile.TemporaryDirectory() as root:
      _write_rtllm(root, TASKS)
      probs = loaders.rtllm(root)
      self.assertEqual(sorted(p.top for p in probs), sorted(t.template + "_design" for t in TASKS))
      self.assertEqual(set(probs[0].data_files), {"data.txt"})
      self.assertNotIn("verified_", probs[0].reference)
      rep = harness.evaluate(probs, oracle.OracleBackend(probs), workers=2)
      self.assertEqual(rep.pass_at(1), 1.0, rep.failures())
      wrong = {scripted.prompt_key(problem_lib.render_prompt(p)): [t.mutant.replace("TopModule", p.top)]
               for p, t in zip(probs, sorted(TASKS, key=lambda t: t.template + "_design"))}
      rep = harness.evaluate(probs, scripted.ScriptedBackend(wrong), workers=2)
      self.assertEqual(rep.pass_at(1), 0.0, rep.failures())
      self.assertEqual(rep.categories(), {"mismatch": 4})

  def test_known_issue_is_reported_beside_the_measured_failure(self):
    t = TASKS[0]
    p = t.problem("detailed")
    p = problem_lib.Problem(**{**p.__dict__, "known_issues": {"iverilog": "planted"}})
    res = harness.score_answers([p], [[t.mutant]], workers=1)[0]
    self.assertEqual(res.reason, f"mismatch: {res.samples[0].detail} [known: planted]")

  def test_logikbench_loader_and_oracle(self):
    probs = loaders.logikbench(groups=("basic",))
    self.assertGreater(len(probs), 10)
    picked = [p for p in probs if p.task_id in ("basic/mux", "basic/bin2gray", "basic/band")]
    self.assertLen(picked, 3)
    rep = harness.evaluate(picked, oracle.OracleBackend(picked), workers=2)
    self.assertEqual(rep.pass_at(1), 1.0, rep.failures())


class CodeExtractionTest(absltest.TestCase):

  def test_extract_and_assemble(self):
    p = TASKS[0].problem()
    text = "Here it is:\n```verilog\nmodule TopModule(); endmodule\n```\nHope it helps."
    self.assertEqual(problem_lib.extract_code(text), "module TopModule(); endmodule\n")
    self.assertEqual(problem_lib.extract_code("[BEGIN]\nmodule X; endmodule\n[END]"), "module X; endmodule\n")
    body = problem_lib.Problem(**{**p.__dict__, "answer_mode": "body"})
    design = problem_lib.assemble(body, "  assign {cout, sum} = a + b;\nendmodule\nmodule junk")
    self.assertTrue(design.startswith(p.interface))
    self.assertTrue(design.rstrip().endswith("endmodule"))
    self.assertNotIn("junk", design)


class ScriptedBackendTest(absltest.TestCase):

  def test_by_prompt_by_order_and_stop(self):
    b = scripted.ScriptedBackend({"p1": ["a", "b"]}, sequence=["s1", "s2", "s3"])
    out = b.generate(["p1", "other"], base.Sampling(n=3))
    self.assertEqual([[c.text for c in cs] for cs in out], [["a", "b", "a"], ["s1", "s2", "s3"]])
    with self.assertRaisesRegex(IndexError, "used up"):
      b.generate(["other"], base.Sampling())
    b = scripted.ScriptedBackend({"p": ["module x; endmodule\nextra words here"]})
    c = b.generate(["p"], base.Sampling(stop=("endmodule",)))[0][0]
    self.assertEqual((c.text, c.finish_reason), ("module x; ", "stop"))
    c = b.generate(["p"], base.Sampling(max_tokens=2))[0][0]
    self.assertEqual((c.text, c.finish_reason), ("module x;", "length"))
    chat = [{"role": "user", "content": "hi"}]
    b = scripted.ScriptedBackend({scripted.prompt_key(chat): ["hello"]})
    self.assertEqual(b.generate([chat], base.Sampling())[0][0].text, "hello")
    with self.assertRaisesRegex(KeyError, "no scripted completion"):
      b.generate(["unknown"], base.Sampling())
    self.assertIsInstance(b, base.Backend)

  def test_replay_roundtrip(self):
    inner = scripted.ScriptedBackend(default=lambda p, j: f"{p}-{j}")
    rec = scripted.RecordingBackend(inner)
    chat = ({"role": "user", "content": "q"},)
    rec.generate(["x", chat], base.Sampling(n=2))
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "replay.jsonl")
      rec.save(path)
      replay = scripted.ReplayBackend.from_file(path)
      out = replay.generate(["x"], base.Sampling(n=2))
      self.assertEqual([c.text for c in out[0]], ["x-0", "x-1"])
      self.assertLen(replay.generate([chat], base.Sampling())[0], 1)
      with open(path, "a") as f:
        f.write("{\"oops\": 1}\n")
      with self.assertRaisesRegex(ValueError, "replay.jsonl:3"):
        scripted.read_replay(path)



class VerilogEvalJobTest(absltest.TestCase):

  def test_oracle_job_on_generated_tasks_writes_results(self):
    from configs import verilog_eval as cfg_lib  # pylint: disable=g-import-not-at-top
    from lacax.jobs import verilog_eval as job  # pylint: disable=g-import-not-at-top
    config = cfg_lib.get_config("oracle")
    config.benchmark.kind = "mg_synthetic"
    config.benchmark.per_template = 1
    config.benchmark.limit = 5
    with tempfile.TemporaryDirectory() as d:
      out = job.run(config, d)
      self.assertEqual(out["pass@1"], 1.0)
      self.assertEqual(out["problems"], 5)
      self.assertTrue(os.path.exists(os.path.join(d, "categories.png")))
      with open(os.path.join(d, "results.jsonl")) as f:
        self.assertLen(f.readlines(), 5)
    config.benchmark.kind = "verilog_eval"
    with self.assertRaisesRegex(ValueError, "benchmark.path"):
      job.run(config, "/nonexistent")


if __name__ == "__main__":
  absltest.main()
