"""Orbax save/restore of parameters: round trip, overwrite that never loses the previous checkpoint, corrupt
parts named."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np

from lacax import errors
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.weights import checkpoint

_CFG = config_lib.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                              num_kv_heads=2, rope_scaling=config_lib.RopeScaling("llama3", 4.0))


class CheckpointTest(absltest.TestCase):

  def test_roundtrip_restores_identical_params_and_config(self):
    params = llama.init_params(_CFG, jax.random.PRNGKey(0))
    path = os.path.join(tempfile.mkdtemp(), "ckpt")
    checkpoint.save_params(path, params, _CFG)
    self.assertEqual(checkpoint.load_config(path), _CFG)
    restored = checkpoint.restore_params(path)
    jax.tree.map(np.testing.assert_array_equal, params, restored)

  def test_existing_directory_is_not_overwritten_silently(self):
    params = llama.init_params(_CFG, jax.random.PRNGKey(0))
    path = os.path.join(tempfile.mkdtemp(), "ckpt")
    checkpoint.save_params(path, params, _CFG)
    with self.assertRaisesRegex(FileExistsError, "exists; pass overwrite=True"):
      checkpoint.save_params(path, params, _CFG)
    checkpoint.save_params(path, jax.tree.map(lambda x: x * 2, params), _CFG, overwrite=True)
    restored = checkpoint.restore_params(path)
    np.testing.assert_array_equal(restored["embed"], params["embed"] * 2)

  def test_missing_directory_is_named(self):
    with self.assertRaisesRegex(FileNotFoundError, "nowhere"):
      checkpoint.restore_params("/nonexistent/nowhere")



class OverwriteTest(absltest.TestCase):
  """`save_params(..., overwrite=True)` stages the new checkpoint beside the old one and swaps atomically."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.old = llama.init_params(_CFG, jax.random.PRNGKey(0))
    cls.new = jax.tree.map(lambda x: x + 1, cls.old)

  def _saved_old(self) -> str:
    path = os.path.join(tempfile.mkdtemp(), "ckpt")
    checkpoint.save_params(path, self.old, _CFG)
    return path

  def _assert_restores(self, path, expected):
    restored = checkpoint.restore_params(path)
    np.testing.assert_array_equal(restored["embed"], expected["embed"])
    np.testing.assert_array_equal(restored["layers"]["wq"], expected["layers"]["wq"])

  def test_interrupted_before_the_swap_leaves_the_old_checkpoint(self):
    path = self._saved_old()
    with mock.patch.object(checkpoint, "_put_in_place", side_effect=KeyboardInterrupt):
      with self.assertRaises(KeyboardInterrupt):
        checkpoint.save_params(path, self.new, _CFG, overwrite=True)
    self._assert_restores(path, self.old)
    self.assertEqual(sorted(os.listdir(os.path.dirname(path))), ["ckpt"])  # the staging copy was removed

  def test_killed_after_the_swap_leaves_the_new_checkpoint(self):
    path = self._saved_old()
    # The old copy is removed after the exchange; a kill right there leaves it as litter, the new one in place.
    with mock.patch.object(checkpoint.shutil, "rmtree", side_effect=KeyboardInterrupt):
      with self.assertRaises(KeyboardInterrupt):
        checkpoint.save_params(path, self.new, _CFG, overwrite=True)
    self._assert_restores(path, self.new)
    checkpoint.save_params(path, self.old, _CFG, overwrite=True)  # the next save removes the litter
    self.assertEqual(sorted(os.listdir(os.path.dirname(path))), ["ckpt"])
    self._assert_restores(path, self.old)

  def test_two_rename_fallback_killed_between_the_renames_restores_the_previous(self):
    path = self._saved_old()
    real_replace = os.replace

    def replace(a, b):
      if os.fspath(b) == path and os.path.basename(os.fspath(a)).startswith(".ckpt.saving-"):
        raise KeyboardInterrupt  # the old one is already moved aside; the new one not yet in place
      return real_replace(a, b)

    with mock.patch.object(checkpoint, "_exchange", return_value=False), \
        mock.patch.object(checkpoint.os, "replace", side_effect=replace):
      with self.assertRaises(KeyboardInterrupt):
        checkpoint.save_params(path, self.new, _CFG, overwrite=True)
    self.assertFalse(os.path.exists(path))
    self._assert_restores(path, self.old)

  def test_a_save_frozen_or_killed_at_any_moment_leaves_old_or_new(self):
    """A real process saving over a checkpoint in a loop, frozen (SIGSTOP) at several moments and restored from
    outside, then killed (SIGKILL): always the old or the new checkpoint, never neither."""
    path = self._saved_old()
    script = textwrap.dedent(f"""
        import jax
        from lacax.model import config as config_lib, llama
        from lacax.weights import checkpoint
        cfg = config_lib.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                     num_kv_heads=2, rope_scaling=config_lib.RopeScaling("llama3", 4.0))
        new = jax.tree.map(lambda x: x + 1, llama.init_params(cfg, jax.random.PRNGKey(0)))
        print("ready", flush=True)
        while True:
          checkpoint.save_params({path!r}, new, cfg, overwrite=True)
          print("saved", flush=True)
        """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertEqual(process.stdout.readline().strip(), "ready")
    for delay in (0.0, 0.05, 0.13, 0.29):
      time.sleep(delay)
      os.kill(process.pid, signal.SIGSTOP)  # freeze it mid-save, restore from outside, let it go on
      restored = checkpoint.restore_params(path)["embed"]
      self.assertTrue(np.array_equal(restored, self.old["embed"]) or np.array_equal(restored, self.new["embed"]))
      os.kill(process.pid, signal.SIGCONT)
    process.kill()
    process.wait()
    restored = checkpoint.restore_params(path)["embed"]
    self.assertTrue(np.array_equal(restored, self.old["embed"]) or np.array_equal(restored, self.new["embed"]))


class CorruptCheckpointTest(absltest.TestCase):
  """Restoring from a damaged directory names the directory and the part."""

  def setUp(self):
    super().setUp()
    self.path = os.path.join(tempfile.mkdtemp(), "ckpt")
    checkpoint.save_params(self.path, llama.init_params(_CFG, jax.random.PRNGKey(0)), _CFG)
    parts = []
    for root, _, names in os.walk(self.path):
      parts += [os.path.relpath(os.path.join(root, n), self.path) for n in names]
    self.parts = sorted(p for p in parts if p != "lacax_checkpoint.json")
    self.data_part = max(self.parts, key=lambda p: os.path.getsize(os.path.join(self.path, p)))

  def test_truncated_part_is_named(self):
    part = os.path.join(self.path, self.data_part)
    with open(part, "r+b") as f:
      f.truncate(os.path.getsize(part) // 2)
    with self.assertRaisesRegex(errors.CheckpointError, f"{self.path}: part '{self.data_part}' is truncated"):
      checkpoint.restore_params(self.path)

  def test_missing_part_is_named(self):
    os.remove(os.path.join(self.path, self.data_part))
    with self.assertRaisesRegex(errors.CheckpointError, f"{self.path}: part '{self.data_part}' is missing"):
      checkpoint.restore_params(self.path)

  def test_corrupt_metadata_is_named(self):
    small = next(p for p in self.parts if p != self.data_part and os.path.getsize(os.path.join(self.path, p)) > 2)
    with open(os.path.join(self.path, small), "r+b") as f:
      f.write(b"\xff\xfe")  # same size, different bytes
    with self.assertRaisesRegex(errors.CheckpointError, f"part '{small}' is corrupt"):
      checkpoint.restore_params(self.path)


if __name__ == "__main__":
  absltest.main()
