"""The edge_llm job (`configs/edge_llm.py:tiny`, `lacax/jobs/edge_llm.py`) end to end on a tiny random model.

Every unit is written; the searched policy and the uniform ones fit the budget; every exit is evaluated beside
the vote and the final head, before and after tuning; the plot is written; a resumed run recomputes nothing and
returns the same figures.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest

from configs import edge_llm as edge_config
from lacax import runs
from lacax.compress import policy as policy_lib
from lacax.jobs import edge_llm as job


class EdgeLLMJobTest(absltest.TestCase):

  def test_tiny_end_to_end_and_resume(self):
    config = edge_config.get_config("tiny")
    job.validate(config)
    run_dir = runs.RunDir(tempfile.mkdtemp(prefix="lacax_edge_llm_"))
    out = job.run(config, run_dir)
    json.dumps(out)
    for unit in ("sensitivity", "policies", "compress/dense", "compress/luc_search", "schedule/luc_search", "tune",
                 "eval"):
      self.assertTrue(run_dir.has_unit(unit), unit)
    self.assertTrue(os.path.isfile(os.path.join(run_dir.path, "edge_llm.png")))
    self.assertTrue(os.path.isfile(os.path.join(run_dir.path, "policies", "luc_search.json")))
    r = config.model.random
    cfg_layers = r.num_layers
    for name in ("luc_search", "uniform_8bit"):
      self.assertLessEqual(out["memory_points"][name]["modelled_bytes"], out["budget_bytes"], name)
      self.assertLess(out["memory_points"][name]["resident_bytes"], out["memory_points"]["dense"]["resident_bytes"])
      self.assertLen(out["policies"][name]["sparsity"], cfg_layers)
    exits = cfg_layers // config.tuning.stride
    for when in ("before", "after"):
      e = out["eval"][when]
      self.assertLen(e["per_exit_ppl"], exits)
      self.assertLen(e["mc"]["per_exit_accuracy"], exits)
      self.assertEqual(e["mc"]["n"], config.eval.mc_examples)
      self.assertGreater(e["vote_ppl"], 1.0)
    self.assertEqual(out["tuning"]["phases"], [[0, 2], [2, 4]])
    self.assertGreaterEqual(out["schedule"]["luc_search"]["speedup_vs_default"], 1.0)
    # The same command resumed: every unit is read back, the figures are the same.
    again = job.run(config, run_dir)
    for key in ("memory_points", "eval", "tuning", "schedule", "policies"):
      self.assertEqual(json.dumps(again[key], sort_keys=True), json.dumps(out[key], sort_keys=True), key)
    # The saved policy loads back and is the one the job used.
    loaded = policy_lib.CompressionPolicy.load(os.path.join(run_dir.path, "policies", "luc_search.json"))
    self.assertEqual(loaded.to_json(), out["policies"]["luc_search"])


if __name__ == "__main__":
  absltest.main()
