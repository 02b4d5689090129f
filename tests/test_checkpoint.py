"""Orbax save/restore of parameters."""

import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np

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


if __name__ == "__main__":
  absltest.main()
