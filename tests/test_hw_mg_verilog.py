"""MG-Verilog data: fixture files of each released layout, writers, MinHash dedup, the balanced sampler's level
frequencies, and the synthetic corpus (deterministic four-level descriptions, references pass, mutants fail)."""

import collections
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from lacax.hw.bench import harness
from lacax.hw.mg_verilog import dedup, records, sampler, tasks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "mg_verilog")
H1 = "module and_gate (\n  input a,\n  input b,\n  output y\n);"


class LayoutTest(absltest.TestCase):

  def test_splits_layout_joins_levels_by_code(self):
    recs = records.load(os.path.join(FIXTURES, "splits"))
    self.assertLen(recs, 2)
    by_header = {r.module_header: r for r in recs}
    gate = by_header[H1]
    self.assertEqual(gate.high_level, "A two-input AND gate.")
    self.assertEqual(gate.detailed, "The output y is the logical AND of inputs a and b; purely combinational.")
    self.assertEqual(gate.block, ("Continuously assigns the AND of a and b to y.",))
    self.assertEqual(gate.code, H1 + "\n  assign y = a & b;\nendmodule")
    self.assertEqual(gate.levels, ("high_level", "detailed", "block"))
    dff = by_header["module dff_en (input clk, input en, input d, output reg q);"]
    self.assertEqual(dff.levels, ("high_level", "detailed"))  # not in the block split

  def test_dict_layout(self):
    recs = records.load(os.path.join(FIXTURES, "dict_train.jsonl"))
    self.assertLen(recs, 2)
    self.assertEqual(recs[0].module_header, H1)
    self.assertEqual(recs[0].high_level, "A two-input AND gate.")
    self.assertEqual(recs[1].block, ("Samples d into q on the rising clock edge.", "Holds q when en is low."))
    self.assertEqual(recs[1].body, "  always @(posedge clk)\n    if (en) q <= d;\nendmodule")

  def test_both_layouts_agree(self):
    a = {r.module_header: r for r in records.load(os.path.join(FIXTURES, "splits"))}
    b = {r.module_header: r for r in records.load(os.path.join(FIXTURES, "dict_train.jsonl"))}
    for h in a:
      self.assertEqual((a[h].code, a[h].high_level, a[h].detailed), (b[h].code, b[h].high_level, b[h].detailed))

  def test_writers_roundtrip(self):
    recs = [records.from_task(t) for t in tasks.generate(1, seed=0, templates=("adder", "fsm_table"))]
    with tempfile.TemporaryDirectory() as d:
      records.write_splits(os.path.join(d, "splits"), recs)
      back = {r.code: r for r in records.load(os.path.join(d, "splits"))}
      for r in recs:
        self.assertEqual((back[r.code].high_level, back[r.code].detailed, back[r.code].block),
                         (r.high_level, r.detailed, r.block))
      with open(os.path.join(d, "splits", "merged_dataset.jsonl")) as f:
        self.assertLen(f.readlines(), 3 * len(recs))  # one pair per (code, released level)
      records.write_dict(os.path.join(d, "dict.jsonl"), recs)
      back = records.load(os.path.join(d, "dict.jsonl"))
      self.assertEqual([(r.code, r.block) for r in back], [(r.code, r.block) for r in recs])
      records.write_lacax(os.path.join(d, "lacax.jsonl"), recs)
      self.assertEqual(records.load(os.path.join(d, "lacax.jsonl")), recs)  # all four levels survive
      for sep, joiner in (("comma", ", "), ("semicolon", ";\n")):
        path = os.path.join(d, f"toolkit_{sep}.jsonl")
        records.write_toolkit(path, recs, separator=sep)
        with open(path) as f:
          row = json.loads(f.readline())
        self.assertEqual(row["output"], recs[0].body)
        self.assertTrue(row["input"].startswith("high_level_global_summary: " + recs[0].high_level))
        self.assertIn(joiner + "detailed_global_summary: ", row["input"])
      with self.assertRaisesRegex(ValueError, "separator='tab'"):
        records.write_toolkit(path, recs, separator="tab")

  def test_bad_file_is_named(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "bad.jsonl")
      with open(path, "w") as f:
        f.write('{"code": "x", "description": "not a dict"}\n')
      with self.assertRaisesRegex(ValueError, "bad.jsonl row 0"):
        records.load(path)


class DedupTest(absltest.TestCase):

  def test_near_duplicates_dropped(self):
    base = tasks.make_task("counter", {"width": 8, "up": True, "reset_value": 0}).reference
    near = base.replace("  always", "\n  always")  # whitespace only: identical token set
    other = tasks.make_task("fsm_table", {"states": 3, "next": ((0, 1), (2, 0), (1, 2)), "out": (0, 1, 1)}).reference
    tiny = "module t; endmodule"
    kept, dropped = dedup.dedup([base, other, near, tiny, tiny])
    self.assertEqual(kept, [base, other, tiny, tiny])  # snippets under 10 tokens are never hashed
    self.assertEqual(dropped, [(2, 0)])


class SamplerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.recs = [records.from_task(t) for t in tasks.generate(2, seed=0)]
    self.n = len(self.recs)

  def _freqs(self, s, epochs):
    c = collections.Counter(l for e in range(epochs) for _, l in s.epoch(e))
    total = sum(c.values())
    return {l: c[l] / total for l in records.LEVELS}, total

  def test_union_is_exactly_balanced(self):
    s = sampler.BalancedSampler(self.recs, "union")
    pairs = s.epoch(0)
    self.assertLen(pairs, 4 * self.n)
    self.assertEqual(collections.Counter(i for i, _ in pairs), {i: 4 for i in range(self.n)})
    self.assertEqual(collections.Counter(l for _, l in pairs), {l: self.n for l in records.LEVELS})
    self.assertNotEqual(pairs, s.epoch(1))  # reshuffled each epoch
    self.assertEqual(pairs, sampler.BalancedSampler(self.recs, "union").epoch(0))  # seeded

  def test_random_level_uniform_once_per_code(self):
    s = sampler.BalancedSampler(self.recs, "random_level", seed=3)
    self.assertEqual(sorted(i for i, _ in s.epoch(0)), list(range(self.n)))
    freqs, total = self._freqs(s, 100)
    for l in records.LEVELS:  # binomial sd = sqrt(.25 * .75 / total) ~ 0.004: 5 sd
      self.assertAlmostEqual(freqs[l], 0.25, delta=0.02)

  def test_weighted(self):
    w = {"high_level": 0.5, "detailed": 0.3, "block": 0.2, "line": 0.0}
    freqs, _ = self._freqs(sampler.BalancedSampler(self.recs, "weighted", weights=w), 100)
    for l, want in w.items():
      self.assertAlmostEqual(freqs[l], want, delta=0.025)
    self.assertEqual(freqs["line"], 0.0)

  @parameterized.parameters(*records.LEVELS)
  def test_single_level(self, level):
    pairs = sampler.BalancedSampler(self.recs, f"single:{level}").epoch(0)
    self.assertEqual({l for _, l in pairs}, {level})
    self.assertLen(pairs, self.n)

  def test_levels_a_record_lacks_are_never_drawn(self):
    recs = records.load(os.path.join(FIXTURES, "splits"))
    s = sampler.BalancedSampler(recs, "union")
    self.assertEqual(sorted((recs[i].module_header[:12], l) for i, l in s.epoch(0)),
                     sorted([("module and_g", "high_level"), ("module and_g", "detailed"), ("module and_g", "block"),
                             ("module dff_e", "high_level"), ("module dff_e", "detailed")]))

  def test_bad_mode(self):
    with self.assertRaisesRegex(ValueError, "single:<level>"):
      sampler.BalancedSampler(self.recs, "single:words")


class SyntheticTasksTest(absltest.TestCase):

  def test_descriptions_are_deterministic_and_exact(self):
    a = tasks.generate(2, seed=5)
    b = tasks.generate(2, seed=5)
    self.assertEqual([t.levels for t in a], [t.levels for t in b])
    self.assertEqual([t.reference for t in a], [t.reference for t in b])
    self.assertNotEqual([t.task_id for t in tasks.generate(2, seed=6)], [t.task_id for t in a])
    t = tasks.make_task("adder", {"width": 4})
    self.assertEqual(t.levels["high_level"], "A circuit that adds two 4-bit numbers and reports the carry.")
    self.assertEqual(t.levels["block"], "block_0: Adds a and b as unsigned 4-bit numbers; the 5-bit result is "
                                        "split into the carry cout and the sum.")
    self.assertEqual(t.levels["line"], "line 7: cout and sum take the 5-bit sum of a and b")
    self.assertEqual(t.reference.splitlines()[6], "  assign {cout, sum} = a + b;")  # line 7 is that line
    self.assertIn("- output cout (1 bit): the carry out of a + b", t.levels["detailed"])

  def test_every_template_reference_passes_and_its_mutant_fails(self):
    ts = tasks.generate(1, seed=11)
    self.assertEqual({t.template for t in ts}, set(tasks.TEMPLATES))
    probs = [t.problem("detailed") for t in ts]
    good = harness.score_answers(probs, [[p.reference_answer()] for p in probs], workers=2)
    self.assertEqual([r.reason for r in good], [""] * len(ts))
    bad = harness.score_answers(probs, [[t.mutant] for t in ts], workers=2)
    self.assertEqual([r.samples[0].category for r in bad], ["mismatch"] * len(ts), [r.task_id for r in bad])

  def test_commented_reference_compiles_to_the_same_behaviour(self):
    t = tasks.make_task("fsm_table", {"states": 4, "next": ((0, 2), (3, 1), (0, 0), (1, 3)), "out": (0, 0, 1, 1)})
    self.assertIn("// from S0: S2 on 1, S0 on 0", t.commented_reference)
    res = harness.score_answers([t.problem("line")], [[t.commented_reference]], workers=1)[0]
    self.assertEqual(res.c, 1, res.reason)

  def test_split_by_family_and_params(self):
    ts = tasks.generate(4, seed=0)
    train, test = tasks.split(ts, "family", held_out=("fsm",))
    self.assertEqual({t.family for t in test}, {"fsm"})
    self.assertNotIn("fsm", {t.family for t in train})
    train, test = tasks.split(ts, "params", test_fraction=0.25)
    self.assertEqual(len(train) + len(test), len(ts))
    self.assertEqual({t.template for t in test} - {t.template for t in train}, set())  # seen templates only
    self.assertFalse({t.task_id for t in train} & {t.task_id for t in test})
    with self.assertRaisesRegex(ValueError, "held_out"):
      tasks.split(ts, "family", held_out=("nope",))


if __name__ == "__main__":
  absltest.main()
