"""A training run killed (SIGKILL) or interrupted (SIGINT) and started again with the same command ends with the
parameters of an uninterrupted run, bit for bit (CPU).

The runs are child processes, all the same command (`python -m tests.test_train_resume <run_dir>`; the
environment's LACAX_TEST_STEP_SLEEP slows the first attempt down so that the parent can kill it mid-run): a
residual MLP with dropout (so the PRNG key must resume too), AdamW with warm-up and cosine decay, gradient
accumulation, checkpoints every 4 of 24 steps. The parent kills a child once it has written a checkpoint, runs the same
command again, and compares the final parameters and the per-step losses with the uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

STEPS = 24
EVERY = 4

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lacax.train import checkpoint as ckpt_lib  # noqa: E402
from lacax.train import loop, optim  # noqa: E402
from lacax.train import metrics as metrics_lib  # noqa: E402
from lacax.train import state as st  # noqa: E402
from tests import train_utils as tu  # noqa: E402


def _dropout_loss(trainable, frozen, batch, rng):
  """tests/train_utils.mlp_loss with dropout (rate 0.2) on the first hidden layer while training."""
  p = st.combine(trainable, frozen)
  h = jnp.tanh(batch["x"] @ p["w_in"] + p["b_in"])
  if rng is not None:
    h = h * jax.random.bernoulli(rng, 0.8, h.shape) / 0.8

  def layer(h, lp):
    return h + jnp.tanh(h @ lp["w"] + lp["b"]), None

  h, _ = jax.lax.scan(layer, h, p["layers"])
  err = (h @ p["w_out"])[:, 0] - batch["y"]
  w = batch["w"]
  return jnp.sum(w * err ** 2) / jnp.maximum(jnp.sum(w), 1.0), {"weight": jnp.sum(w)}


def child(run_dir: str, sleep: float) -> None:
  params = tu.mlp_params(seed=1)
  opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=5e-3, warmup_steps=3, weight_decay=0.01),
                                    STEPS)
  labels = st.make_labels(params, frozen=("b_in",))
  state = st.create_train_state(params, opt, labels=labels, seed=7)
  config = loop.TrainConfig(steps=STEPS, accum_steps=2, log_every=1, checkpoint_every=EVERY, keep_checkpoints=2,
                            progress=False)
  trainer = loop.Trainer(_dropout_loss, opt, config, schedule=sched, labels=labels)

  def batch_at(step):
    if sleep:
      time.sleep(sleep)
    return tu.regression_batch(step, 16, ragged=True)

  try:
    state, _ = trainer.fit(state, batch_at, run_dir=run_dir, checkpoint_dir=os.path.join(run_dir, "ckpt"),
                           run_config={"train": {"steps": STEPS}})
  except KeyboardInterrupt:
    sys.exit(130)
  flat = {st.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(os.path.join(run_dir, "final.npz"), **flat)


def _run(run_dir: str, sleep: float = 0.0) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["LACAX_TEST_STEP_SLEEP"] = str(sleep)
  return subprocess.Popen([sys.executable, "-m", "tests.test_train_resume", run_dir], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> int:
  out, _ = proc.communicate(timeout=timeout)
  if proc.returncode not in (0, 130, -signal.SIGKILL):
    raise AssertionError(f"training child failed ({proc.returncode}):\n{out[-3000:]}")
  return proc.returncode


def _wait_for_checkpoint(run_dir: str, proc: subprocess.Popen, min_step: int, timeout: float = 240) -> int:
  ckpt = os.path.join(run_dir, "ckpt")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"child exited ({proc.returncode}) before checkpoint {min_step}:\n{proc.stdout.read()[-3000:]}")
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    if steps and max(steps) >= min_step:
      return max(steps)
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint >= {min_step} in {ckpt} after {timeout} s")


class ResumeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ref_dir = tempfile.mkdtemp(prefix="lacax_train_ref_")
    _finish(_run(cls.ref_dir))
    cls.ref = dict(np.load(os.path.join(cls.ref_dir, "final.npz")))
    cls.ref_losses = [r["loss"] for r in metrics_lib.read_metrics(os.path.join(cls.ref_dir, "metrics.jsonl"))
                      if "loss" in r]

  def _check_same_as_uninterrupted(self, run_dir):
    final = dict(np.load(os.path.join(run_dir, "final.npz")))
    self.assertEqual(sorted(final), sorted(self.ref))
    for k in self.ref:
      np.testing.assert_array_equal(final[k], self.ref[k], err_msg=k)
    records = metrics_lib.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    self.assertEqual([r["step"] for r in records if "loss" in r], list(range(1, STEPS + 1)))
    self.assertEqual([r["loss"] for r in records if "loss" in r], self.ref_losses)

  def test_reference_run_trained(self):
    self.assertLen(self.ref_losses, STEPS)
    self.assertLess(np.mean(self.ref_losses[-4:]), np.mean(self.ref_losses[:4]))
    # Keeps the last 2 checkpoints, the final one among them.
    self.assertEqual(ckpt_lib.Checkpointer(os.path.join(self.ref_dir, "ckpt")).all_steps(), [20, 24])

  def test_sigkill_then_same_command_resumes_bit_identical(self):
    run_dir = tempfile.mkdtemp(prefix="lacax_train_kill_")
    proc = _run(run_dir, sleep=0.15)
    killed_after = _wait_for_checkpoint(run_dir, proc, 2 * EVERY)
    proc.send_signal(signal.SIGKILL)
    self.assertEqual(_finish(proc), -signal.SIGKILL)
    self.assertFalse(os.path.exists(os.path.join(run_dir, "final.npz")))
    self.assertLess(killed_after, STEPS)
    _finish(_run(run_dir))
    self._check_same_as_uninterrupted(run_dir)

  def test_sigint_saves_and_resumes_bit_identical(self):
    run_dir = tempfile.mkdtemp(prefix="lacax_train_int_")
    proc = _run(run_dir, sleep=0.15)
    _wait_for_checkpoint(run_dir, proc, EVERY)
    time.sleep(0.3)  # between checkpoints: the interrupt must save a checkpoint of its own
    proc.send_signal(signal.SIGINT)
    self.assertEqual(_finish(proc), 130)
    saved = ckpt_lib.Checkpointer(os.path.join(run_dir, "ckpt")).latest_step()
    self.assertLess(saved, STEPS)
    self.assertFalse(os.path.exists(os.path.join(run_dir, "final.npz")))
    _finish(_run(run_dir))
    self._check_same_as_uninterrupted(run_dir)


if __name__ == "__main__":
  if len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
    child(sys.argv[1], float(os.environ.get("LACAX_TEST_STEP_SLEEP", "0")))
  else:
    absltest.main()
