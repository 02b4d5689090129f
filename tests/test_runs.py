"""Runs keep what they computed: units, status, resume after SIGKILL / SIGTERM / SIGINT, a full disk, standard JSON.

The kill tests run the real launcher (`python -m experiments.run`) in a subprocess on a tiny random model saved
with a tiny BPE tokenizer (`tests/hf_models.saved_model_with_tokenizer`), kill it once its first unit is on
disk, resume it with `--config.resume`, and compare the final results.json with an uninterrupted run.
"""

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import numpy as np

from lacax import errors
from lacax import io as lacax_io
from lacax import runs
from tests import hf_models

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMING = ("seconds", "tokens_per_second", "utc_time", "finished")


def _without_timings(value):
  """A results document without the fields that measure time (they differ between any two runs)."""
  if isinstance(value, dict):
    return {k: _without_timings(v) for k, v in value.items() if not any(t in k for t in _TIMING)}
  if isinstance(value, list):
    return [_without_timings(v) for v in value]
  return value


def _strict_load(path: str):
  """json.load that fails on the non-standard NaN / Infinity constants."""
  with open(path) as f:
    return json.load(f, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(f"bare {name} in {path}")))


class RunDirTest(absltest.TestCase):

  def test_unit_is_computed_once_and_read_back_identically(self):
    run_dir = runs.RunDir(tempfile.mkdtemp())
    calls = []

    def compute():
      calls.append(1)
      return {"ppl": 1.5, "curve": np.arange(3.0), "bad": float("nan"), "text": "NaN"}

    first = run_dir.unit("policy-full", compute)
    again = runs.RunDir(run_dir.path).unit("policy-full", compute)
    self.assertLen(calls, 1)
    self.assertEqual(first["curve"], [0.0, 1.0, 2.0])
    self.assertTrue(math.isnan(again["bad"]))
    self.assertEqual(again["text"], "NaN")  # a string stays a string
    self.assertEqual(run_dir.finished_units(), ["policy-full"])

  def test_corrupt_unit_is_recomputed(self):
    run_dir = runs.RunDir(tempfile.mkdtemp())
    run_dir.save_unit("cell", [1, 2])
    with open(run_dir._unit_path("cell"), "w") as f:
      f.write('{"key": "cell", "val')
    self.assertIsNone(run_dir.load_unit("cell"))
    self.assertEqual(run_dir.unit("cell", lambda: [3]), [3])

  def test_full_disk_keeps_every_finished_unit(self):
    run_dir = runs.RunDir(tempfile.mkdtemp())
    run_dir.unit("a", lambda: {"x": 1})
    real_fdopen = os.fdopen

    class FullDisk:
      def __init__(self, f):
        self.f = f

      def __enter__(self):
        return self

      def __exit__(self, *exc):
        self.f.close()

      def write(self, data):
        self.f.write(data[:len(data) // 2])  # half of it lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch.object(lacax_io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode))):
      with self.assertRaises(OSError) as ctx:
        run_dir.unit("b", lambda: {"x": 2})
      run_dir.set_status("failed", error=ctx.exception)  # logged, not raised, when the disk is full
    self.assertEqual(ctx.exception.errno, errno.ENOSPC)
    self.assertEqual(run_dir.load_unit("a"), {"x": 1})
    self.assertIsNone(run_dir.load_unit("b"))
    self.assertEqual(sorted(os.listdir(os.path.join(run_dir.path, "units"))), ["a.json"])  # no temp litter
    self.assertEqual(run_dir.unit("b", lambda: {"x": 2}), {"x": 2})  # space again: the run goes on

  def test_results_are_standard_json_with_nonfinite_flagged(self):
    run_dir = runs.RunDir(tempfile.mkdtemp())
    flagged = run_dir.write_results({"figures": {"lacache": {"ppl": float("inf"), "curve": [1.0, float("nan")]}},
                                     "n": np.int64(3), "mean": np.float32(0.5)})
    self.assertEqual(flagged, ["figures.lacache.ppl", "figures.lacache.curve[1]"])
    document = _strict_load(os.path.join(run_dir.path, "results.json"))
    self.assertEqual(document["figures"]["lacache"]["ppl"], "Infinity")
    self.assertEqual(document["nonfinite"], flagged)
    self.assertEqual((document["n"], document["mean"]), (3, 0.5))

  def test_resume_finds_latest_and_refuses_a_different_config(self):
    root = tempfile.mkdtemp()
    first = runs.RunDir.create(root, "lacache")
    first.write_config({"num_tokens": 300, "cache": {"size": 64}, "resume": ""})
    time.sleep(0.01)
    second = runs.RunDir.create(root, "lacache")
    second.write_config({"num_tokens": 300, "cache": {"size": 64}, "resume": ""})
    self.assertEqual(runs.RunDir.find("latest", root, "lacache").path, second.path)
    self.assertEqual(second.check_config({"num_tokens": 300, "cache": {"size": 64}, "resume": "latest"}), [])
    self.assertEqual(second.check_config({"num_tokens": 200, "cache": {"size": 64, "span": 2}}),
                     ["cache.span: saved '<missing>', now 2", "num_tokens: saved 300, now 200"])
    with self.assertRaisesRegex(errors.RunError, "no run of 'passkey'"):
      runs.RunDir.find("latest", root, "passkey")
    with self.assertRaisesRegex(errors.RunError, "not a lacax run directory"):
      runs.RunDir.find(tempfile.mkdtemp(), root, "lacache")

  def test_a_failing_plot_is_reported_not_raised(self):
    def plot(path):
      raise RuntimeError(f"no display for {path}")

    with self.assertLogs(level="ERROR") as logs:
      self.assertEqual(runs.safe_plot("heatmap.png", plot, "/x/heatmap.png"),
                       "RuntimeError: no display for /x/heatmap.png")
    self.assertIn("the results are unaffected", logs.output[0])
    self.assertIsNone(runs.safe_plot("ok.png", lambda: None))

  def test_status_tells_a_dead_run_from_a_live_one(self):
    run_dir = runs.RunDir(tempfile.mkdtemp())
    run_dir.set_status("running")
    self.assertTrue(run_dir.status()["alive"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    status = run_dir.status()
    status["pid"] = int(dead.stdout)
    lacax_io.write_json(os.path.join(run_dir.path, runs.STATUS_FILE), status)
    self.assertFalse(run_dir.status()["alive"])
    run_dir.set_status("failed", error=ValueError("boom"))
    self.assertEqual(run_dir.status()["error"], "ValueError: boom")


class LauncherTest(absltest.TestCase):
  """Typos and invalid configs: one message, before any model is loaded."""

  def _run(self, *args, env=None):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=_REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})

  def test_misspelled_field_is_one_line_with_the_suggestion(self):
    out = self._run("--config=configs/passkey.py:cpu", "--config.grid.lenghts=(256,)")
    self.assertEqual(out.returncode, 2)
    self.assertEqual(out.stderr.strip().splitlines()[-1],
                     "error: --config.grid.lenghts is not a field of configs/passkey.py:cpu; did you mean "
                     "--config.grid.lengths?")
    self.assertNotIn("Traceback", out.stderr)

  def test_every_problem_is_listed_before_loading(self):
    haystack = os.path.join(tempfile.mkdtemp(), "latin1.txt")
    with open(haystack, "wb") as f:
      f.write("caf\u00e9 au lait".encode("latin-1"))
    out = self._run("--config=configs/niah.py:cpu", "--config.policies=('full','lacahe')",
                    "--config.grid.depths=(0.0,1.5)", f"--config.haystack.path={haystack}",
                    "--config.model.path=/nonexistent/model", f"--config.results_dir={tempfile.mkdtemp()}")
    self.assertEqual(out.returncode, 1)
    self.assertNotIn("Traceback", out.stderr)
    message = out.stderr[out.stderr.index("error: "):]
    self.assertIn("has 4 problems", message)
    self.assertIn("grid.depths=(0.0, 1.5) must be", message)
    self.assertIn("policies contains 'lacahe'", message)
    self.assertIn(f"{haystack}, byte offset 3: not valid utf-8 text", message)
    self.assertIn("set haystack.encoding to the file's encoding", message)
    self.assertIn("model.path='/nonexistent/model' does not exist", message)


# Runs the launcher with RunDir.save_unit holding the run after each unit it stores, so a test that signals the
# run after its first unit cannot lose the race to the remaining units (a tiny job's whole run took 8 s).
_HOLD_AFTER_UNIT = """
import os, runpy, sys, time
# experiments.run would otherwise re-exec itself with glibc's huge-page tunable (lacax.memory), a fresh
# interpreter without this shim, and the signal could again land after the last unit.
os.environ["LACAX_HUGEPAGES"] = "0"
from lacax import runs
_save = runs.RunDir.save_unit
def _save_and_hold(self, key, value):
  _save(self, key, value)
  time.sleep(600)  # the test's signal arrives here
runs.RunDir.save_unit = _save_and_hold
sys.argv = ["experiments/run.py", *sys.argv[1:]]
runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)
"""


class _JobRun:
  """A launcher subprocess whose units directory is watched; `hold=True` pauses it after every stored unit."""

  def __init__(self, args, results_dir, hold=False):
    self.results_dir = results_dir
    launcher = ["-c", _HOLD_AFTER_UNIT] if hold else ["-m", "experiments.run"]
    self.process = subprocess.Popen([sys.executable, *launcher, *args,
                                     f"--config.results_dir={results_dir}"], cwd=_REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def units(self) -> list[str]:
    found = []
    for root, dirs, files in os.walk(self.results_dir):
      if os.path.basename(root) == "units":
        found += [f for f in files if f.endswith(".json") and not f.startswith(".")]
    return found

  def kill_after_first_unit(self, sig, timeout=600):
    start = time.time()
    while not self.units():
      if self.process.poll() is not None:
        raise AssertionError(f"the run ended before its first unit:\n{self.process.stderr.read()[-3000:]}")
      if time.time() - start > timeout:
        raise AssertionError("no unit within the timeout")
      time.sleep(0.02)
    self.process.send_signal(sig)
    _, stderr = self.process.communicate(timeout=300)
    return stderr

  def finish(self):
    stdout, stderr = self.process.communicate(timeout=900)
    if self.process.returncode != 0:
      raise AssertionError(f"run failed ({self.process.returncode}):\n{stderr[-3000:]}")
    return stdout


def _run_dir(results_dir: str) -> str:
  (experiment,) = os.listdir(results_dir)
  (stamp,) = os.listdir(os.path.join(results_dir, experiment))
  return os.path.join(results_dir, experiment, stamp)


class KillAndResumeTest(absltest.TestCase):
  """A run killed after its first unit, resumed, ends with the results of an uninterrupted run."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = hf_models.saved_model_with_tokenizer(num_layers=4)

  def _kill_resume_compare(self, args, sig, expected_status):
    killed = tempfile.mkdtemp(prefix="lacax_killed_")
    reference = tempfile.mkdtemp(prefix="lacax_reference_")
    run = _JobRun(args, killed, hold=True)
    run.kill_after_first_unit(sig)
    run_dir = runs.RunDir(_run_dir(killed))
    done_at_kill = run_dir.finished_units()
    self.assertLen(done_at_kill, 1, "the run was not held after its first unit")
    status = run_dir.status()
    self.assertEqual(status["state"], expected_status, str(status))
    if sig == signal.SIGKILL:
      self.assertFalse(status["alive"])  # "running", but its process is gone
    else:
      self.assertIn(signal.Signals(sig).name, status["error"])
    self.assertFalse(os.path.exists(os.path.join(run_dir.path, "results.json")))
    _JobRun([*args, f"--config.resume={run_dir.path}"], killed).finish()
    self.assertEqual(run_dir.status()["state"], "done")
    self.assertEqual(run_dir.status()["resumed"], 1)
    _JobRun(args, reference).finish()
    resumed = _strict_load(os.path.join(run_dir.path, "results.json"))
    uninterrupted = _strict_load(os.path.join(_run_dir(reference), "results.json"))
    self.assertEqual(_without_timings(resumed["figures"]), _without_timings(uninterrupted["figures"]))
    return done_at_kill, resumed, uninterrupted

  def test_main_job_sigkill_after_the_first_policy(self):
    args = ["--config=configs/lacache.py:cpu", f"--config.model.path={self.model}", "--config.num_tokens=200",
            "--config.chunk=50", "--config.cache.size=48", "--config.cache.span=2"]
    done, resumed, uninterrupted = self._kill_resume_compare(args, signal.SIGKILL, "running")
    self.assertBetween(len(done), 1, 2)
    self.assertEqual(resumed["running_ppl"], uninterrupted["running_ppl"])
    self.assertEqual(sorted(resumed["figures"]), ["full", "lacache", "streaming"])

  def test_passkey_sigterm_after_the_first_cell(self):
    args = ["--config=configs/passkey.py:cpu", f"--config.model.path={self.model}",
            "--config.grid.lengths=(160,224)", "--config.grid.depths=(0.0,1.0)", "--config.grid.samples_per_cell=1",
            "--config.cache.span=2", "--config.cache.budget=0.6", "--config.policies=('full','lacache')"]
    done, resumed, uninterrupted = self._kill_resume_compare(args, signal.SIGTERM, "failed")
    self.assertBetween(len(done), 1, 3)
    self.assertEqual(resumed["samples"], uninterrupted["samples"])

  def test_longbench_sigint_after_the_first_task(self):
    data = tempfile.mkdtemp(prefix="lacax_longbench_")
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for task, n_words in (("hotpotqa", 150), ("trec", 260)):
      with open(os.path.join(data, f"{task}.jsonl"), "w") as f:
        for i in range(2):
          f.write(json.dumps(dict(input=f"Question {i}?", context=" ".join(rng.choice(words) for _ in range(n_words)),
                                  answers=["alpha"], length=n_words, dataset=task, language="en",
                                  all_classes=["Number", "Person"] if task == "trec" else None, _id=f"{task}{i}"))
                  + "\n")
    args = ["--config=configs/longbench.py:cpu", f"--config.model.path={self.model}", f"--config.data.path={data}",
            "--config.tasks=('hotpotqa','trec')", "--config.policies=('full','lacache')", "--config.max_length=256",
            "--config.chat=False", "--config.cache.span=2", "--config.cache.budget=0.6"]
    done, _, _ = self._kill_resume_compare(args, signal.SIGINT, "failed")
    self.assertBetween(len(done), 1, 3)


if __name__ == "__main__":
  absltest.main()
