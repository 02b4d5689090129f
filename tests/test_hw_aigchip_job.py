"""The gpt4aigchip job end to end at `:tiny` (real iverilog and yosys), its resume, and its config validation."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest

from configs import gpt4aigchip as gpt4aigchip_config
from lacax import errors
from lacax import runs
from lacax.jobs import gpt4aigchip as job

_TOOLS = all(shutil.which(t) for t in ("iverilog", "vvp", "yosys"))


class JobTest(absltest.TestCase):

  @absltest.skipUnless(_TOOLS, "needs iverilog and yosys")
  def test_tiny_runs_writes_plots_and_resumes_without_resimulating(self):
    config = gpt4aigchip_config.get_config("tiny")
    root = tempfile.mkdtemp(prefix="lacax_aigchip_")
    rd = runs.RunDir.create(root, "gpt4aigchip")
    out = job.run(config, rd)
    self.assertEqual({r["method"] for r in out["rows"]}, {"evolution", "random"})
    self.assertTrue(out["cycles_equal_analytic"])
    self.assertGreater(out["evaluations_simulated"], 0)
    for name in ("fitness_vs_evaluations.png", "pareto.png", "trajectories.jsonl"):
      self.assertTrue(os.path.isfile(rd.file(name)), name)
    with open(rd.file("trajectories.jsonl")) as f:
      lines = [json.loads(l) for l in f]
    self.assertLen(lines, 2 * config.search.budget)
    for m, per_seed in out["summaries"].items():
      for s in per_seed.values():
        self.assertEqual(s["evaluations"], config.search.budget, m)
    best = [r for r in lines if r["ok"]]
    self.assertNotEmpty(best)
    self.assertTrue(all(r["fitness"] is not None for r in best))
    self.assertTrue(all(r["fitness"] is None for r in lines if not r["ok"]))
    again = job.run(config, rd)  # every search and evaluation is a finished unit now
    self.assertEqual(again["evaluations_simulated"], 0)
    self.assertEqual(again["summaries"], out["summaries"])

  def test_validation_names_fields(self):
    config = gpt4aigchip_config.get_config("tiny")
    config.space.rows = (3,)
    config.proposer = "oracle"
    config.search.population = 99
    with self.assertRaises(errors.ValidationError) as cm:
      job.validate(config)
    text = str(cm.exception)
    self.assertIn("space.rows=(3,) must be a non-empty subset of", text)
    self.assertIn("proposer='oracle' must be one of", text)
    self.assertIn("search.population=99 must be an integer in [1, budget=4]", text)
    with self.assertRaisesRegex(ValueError, "variant 'gpu' of configs/gpt4aigchip.py is unknown"):
      gpt4aigchip_config.get_config("gpu")
    config = gpt4aigchip_config.get_config("tiny")
    config.template.pe = "c++"
    with self.assertRaisesRegex(errors.ValidationError, r"template.pe='c\+\+' must be one of \('verilog', 'dslx'\)"):
      job.validate(config)
    with self.assertRaisesRegex(errors.ValidationError, "template.pe='dslx' conflicts with search.mode='code'"):
      job.validate(gpt4aigchip_config.get_config("code,dslx"))
    for variant in ("", "cpu", "cpu,local", "heuristic", "code", "cpu,ablation", "cpu,dslx"):
      job.validate(gpt4aigchip_config.get_config(variant))


if __name__ == "__main__":
  absltest.main()
