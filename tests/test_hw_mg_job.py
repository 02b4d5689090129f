"""The mg_verilog job (`configs/mg_verilog.py:tiny`, `lacax/jobs/mg_verilog.py`) end to end on a tiny random model.

Every variant is one unit (its fine-tune and its evaluations); the per-set JSONL files, the table's rows and the
plot are written; a resumed run recomputes nothing and returns the same rows.
"""

from __future__ import annotations

import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest

from configs import mg_verilog as mg_config
from lacax import runs
from lacax.hw.mg_verilog import finetune as ft
from lacax.jobs import mg_verilog as job


class MGVerilogJobTest(absltest.TestCase):

  def test_tiny_end_to_end_and_resume(self):
    config = mg_config.get_config("tiny")
    run_dir = runs.RunDir(tempfile.mkdtemp(prefix="lacax_mg_verilog_"))
    out = job.run(config, run_dir)
    json.dumps(out)
    self.assertEqual(sorted(run_dir.finished_units()), ["variant:base", "variant:union"])
    self.assertIsNone(out["plot_error"])
    self.assertTrue(os.path.isfile(os.path.join(run_dir.path, "per_level.png")))
    sets = sorted({r["set"] for r in out["rows"]})
    self.assertEqual(sets, ["held_out_families", "held_out_params"])
    self.assertLen(out["rows"], 2 * len(sets) * len(config.eval.levels))
    for r in out["rows"]:
      self.assertEqual(r["tasks"], 1)
      for k in config.eval.ks:
        self.assertBetween(r[f"pass@{k}"], 0.0, 1.0)
    self.assertEqual(list(out["training"]), ["union"])
    self.assertEqual(out["training"]["union"]["steps"], config.train.steps)
    self.assertTrue(any(name.startswith("union__synthetic") for name in os.listdir(run_dir.path)))
    # The same command resumed: nothing is fine-tuned again, the rows are the same.
    with mock.patch.object(ft, "finetune", side_effect=AssertionError("a finished variant was recomputed")):
      again = job.run(config, run_dir)
    self.assertEqual(json.dumps(again["rows"], sort_keys=True), json.dumps(out["rows"], sort_keys=True))
    self.assertEqual(again["training"], out["training"])


if __name__ == "__main__":
  absltest.main()
