"""The comparison job: one task-job run per (policy, budget), the leaderboard, its plot and resume.

The task job is replaced by a recording stand-in (the real task jobs have their own tests; running them here
would compile one decode loop per pair), so these tests check what the comparison itself does: the
sub-configs it builds, the units it stores, the order of the leaderboard and that a resumed run calls nothing.
"""

import json
import os
import tempfile
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from lacax import errors
from lacax.cache import registry
from lacax.jobs import compare_policies as compare
from lacax.weights import loader
from tests import cache_policies


class _FakeJob:
  """Scores a policy by a formula of its budget, and records every call."""

  def __init__(self):
    self.calls = []

  def run(self, config, run_dir, *, model=None):
    del model
    policy = config.policies[0]
    budget = config.cache.budget
    self.calls.append((policy, budget, os.path.basename(os.fspath(run_dir))))
    score = {"full": 1.0, "streaming": 0.2 + 0.5 * budget, "snapkv": 0.3 + budget}[policy]
    return {"figures": {policy: {"mean": score}}}

  def validate(self, config):
    del config


def _config(task="passkey", variant="cpu"):
  from configs import compare_policies as compare_config  # pylint: disable=g-import-not-at-top

  config = compare_config.get_config(f"{task},{variant}")
  config.policies = ("full", "streaming", "snapkv")
  config.budgets = (0.5, 0.25)
  return config


class ComparePoliciesTest(parameterized.TestCase):

  # The stand-in job never touches the model: the comparison only reads its name and fingerprint.
  model = types.SimpleNamespace(cfg=types.SimpleNamespace(name="stand-in"), fingerprint=lambda: "0" * 16)

  def test_one_run_per_policy_and_budget_leaderboard_plot_and_resume(self):
    fake = _FakeJob()
    run_dir = tempfile.mkdtemp(prefix="lacax_compare_")
    with mock.patch.object(compare, "_job", lambda task: fake):
      out = compare.run(_config(), run_dir, model=self.model)
    self.assertEqual(sorted(fake.calls), sorted([
        ("full", 0.5, "full-bfull"),  # the full cache runs once, at the job's own budget
        ("streaming", 0.5, "streaming-b0.5"), ("streaming", 0.25, "streaming-b0.25"),
        ("snapkv", 0.5, "snapkv-b0.5"), ("snapkv", 0.25, "snapkv-b0.25")]))
    board = out["leaderboard"]
    self.assertEqual([r["policy"] for r in board], ["full", "snapkv", "streaming"])  # by mean score, best first
    self.assertEqual(board[1]["scores"], {"0.5": 80.0, "0.25": 55.00000000000001})
    self.assertAlmostEqual(board[2]["mean"], 100 * (0.45 + 0.325) / 2)
    self.assertTrue(os.path.isfile(os.path.join(run_dir, "leaderboard.png")))
    table = compare.format_leaderboard(board, (0.5, 0.25), out["metric"])
    self.assertIn("1    full", table)
    json.dumps(out)
    again = _FakeJob()
    with mock.patch.object(compare, "_job", lambda task: again):
      resumed = compare.run(_config(), run_dir, model=self.model)
    self.assertEqual(again.calls, [])
    self.assertEqual(resumed["leaderboard"], board)

  def test_lower_is_better_for_perplexity_and_the_budget_becomes_the_cache_size(self):
    config = _config("streaming", "cpu")
    sub = compare.task_config(config, "streaming", 0.25)
    self.assertEqual(sub.cache.size, int(0.25 * config.job.num_tokens))
    self.assertEqual(tuple(sub.policies), ("streaming",))
    self.assertFalse(compare.TASKS["streaming"][2])
    sub = compare.task_config(_config("ruler", "cpu"), "snapkv", 0.25)
    self.assertEqual((sub.cache.budget, sub.experiment), (0.25, "ruler"))

  @parameterized.parameters("passkey,cpu", "niah,cpu", "ruler,cpu", "ruler,4k", "streaming,cpu", "longbench,cpu")
  def test_variants_build_the_task_jobs_config(self, variant):
    from configs import compare_policies as compare_config  # pylint: disable=g-import-not-at-top

    config = compare_config.get_config(variant)
    compare.validate_config(config)
    self.assertEqual(config.job.experiment, compare.TASKS[config.task][0])

  def test_every_registered_policy_passes_validation_on_the_embedded_model(self):
    # The default policies are all of them: each builds from the config defaults (CaM's inner, composed and
    # perlayer, budgeted through their parts), and every policy but the full cache runs at every budget.
    from configs import compare_policies as compare_config  # pylint: disable=g-import-not-at-top

    config = compare_config.get_config("passkey,cpu")
    self.assertEqual(tuple(config.policies), registry.policy_names())
    # Without calibration files, the two calibrated scorers are refused up front, by name.
    with self.assertRaises(errors.ValidationError) as e:
      compare.validate(config)
    self.assertEqual(sorted(m.split("'")[1] for m in e.exception.problems), ["expectedattention", "qfilter"])
    self.assertIn("python -m experiments.calibrate_scorers", str(e.exception))
    cfg = loader.read_model_config()
    config.job.cache.qfilter_path = cache_policies.qfilter_file(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    config.job.cache.expected_attention_stats = cache_policies.expected_attention_file(cfg.num_layers, cfg.num_heads,
                                                                                       cfg.head_dim)
    compare.validate(config)
    pairs = compare._pairs(config)  # pylint: disable=protected-access
    self.assertEqual(pairs.count(("full", None)), 1)
    self.assertLen(pairs, 1 + len(config.budgets) * (len(registry.policy_names()) - 1))

  def test_streaming_runs_the_policies_that_compress_while_decoding(self):
    # A prefill-only policy never compresses in token-by-token streaming: its perplexity would be the full
    # cache's, so the streaming comparison leaves it out by default and the job refuses it by name.
    from configs import compare_policies as compare_config  # pylint: disable=g-import-not-at-top

    config = compare_config.get_config("streaming,cpu")
    self.assertContainsSubset(("full", "streaming", "lacache", "h2o", "tova", "decoding", "cam"), config.policies)
    self.assertNotIn("snapkv", config.policies)
    compare.validate(config)
    config.policies = ("full", "snapkv", "knorm")
    with self.assertRaises(errors.ValidationError) as e:
      compare.validate(config)
    self.assertEqual([m.split("'")[1] for m in e.exception.problems], ["snapkv", "knorm"])
    self.assertIn("compresses only at a prefill hand-off", str(e.exception))
    config.policies = ("full", "knorm")
    config.job.cache.during_decode = True  # the kvpress scorers evict at every step
    compare.validate(config)
    config.policies = ("full", "decoding")
    config.job.cache.compression_interval = 512  # kvpress's default: longer than the 512-token stream
    with self.assertRaisesRegex(errors.ValidationError, r"policy 'decoding' compresses every "
                                r"compression_interval=512 decode steps, but the stream feeds 511: it would never"):
      compare.validate(config)

  def test_validation_names_the_field(self):
    config = _config()
    config.budgets = (0.5, 1.5)
    config.policies = ("full", "bogus")
    with self.assertRaises(errors.ValidationError) as e:
      compare.validate_config(config)
    text = str(e.exception)
    self.assertIn("budgets=(0.5, 1.5) must be a non-empty tuple of fractions in (0, 1]", text)
    self.assertIn("policies contains 'bogus'", text)
    from configs import compare_policies as compare_config  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(ValueError, "the task 'mmlu' is unknown"):
      compare_config.get_config("mmlu")


if __name__ == "__main__":
  absltest.main()
