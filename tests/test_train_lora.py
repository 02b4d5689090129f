"""LoRA fine-tuning through the loop (`lacax.train.lm.lora_setup` over `lacax.model.lora`) on a tiny Llama.

Only the adapters train (the base weights stay bit-identical and get no optimizer state); the fresh adapters leave
the loss of the base model unchanged; the loss falls; a layer window trains only its layers' adapters; the merged
export computes what the adapted forward computes.
"""

from __future__ import annotations

import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.train import data as data_lib
from lacax.train import lm, loop, optim
from lacax.train import state as st
from lacax.weights import checkpoint as params_ckpt
from lacax.weights.loader import Model
from tests import train_utils as tu


def _model() -> Model:
  cfg = tu.tiny_llama_cfg(num_layers=3)
  return Model(cfg=cfg, params=llama.init_params(cfg, jax.random.PRNGKey(0), std=0.05), tokenizer=None,
               source="random")


def _data(cfg) -> data_lib.SequenceDataset:
  ids = np.tile(np.arange(9) * 29 % cfg.vocab_size, 80)
  return data_lib.pack_ids(ids, seq_len=24, batch_size=4)


def _train(setup, steps=30, lr=1e-2):
  opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=lr, warmup_steps=2, weight_decay=0.01),
                                    steps)
  state = st.create_train_state(setup.params, opt, labels=setup.labels, seed=0)
  trainer = loop.Trainer(setup.loss_fn, opt, loop.TrainConfig(steps=steps, progress=False), schedule=sched,
                         labels=setup.labels)
  return trainer.fit(state, _data(setup.cfg).batch)


class LoraTrainingTest(absltest.TestCase):

  def test_only_adapters_train_and_loss_falls(self):
    model = _model()
    setup = lm.lora_setup(model, rank=4, alpha=8.0, dropout=0.1, targets=("q", "v", "down"))
    batch = jax.tree_util.tree_map(jnp.asarray, _data(model.cfg).batch(0))
    # Fresh adapters (B = 0): the loss is the base model's.
    trainable, frozen = st.partition(setup.params, setup.labels)
    base_loss, _ = loop.make_eval_step(setup.loss_fn)(st.TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=None, rng=jax.random.PRNGKey(0)),
        batch)
    full_loss, _ = lm.full_setup(model).loss_fn(model.params, None, batch, None)
    self.assertAlmostEqual(float(base_loss), float(full_loss), delta=1e-6 * float(full_loss))
    state, records = _train(setup)
    losses_ = [r["loss"] for r in records if "loss" in r]
    self.assertLess(np.mean(losses_[-5:]), 0.9 * np.mean(losses_[:5]))
    for a, b in zip(jax.tree_util.tree_leaves(state.params["params"]), jax.tree_util.tree_leaves(model.params)):
      np.testing.assert_array_equal(a, b)
    shapes = {x.shape for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0}
    self.assertEqual(shapes, {x.shape for x in jax.tree_util.tree_leaves(state.params["lora"])})
    self.assertGreater(float(jnp.abs(state.params["lora"]["wv"]["b"]).max()), 0.0)

  def test_layer_window_trains_only_its_adapters(self):
    model = _model()
    setup = lm.lora_setup(model, rank=4, targets=("q",), layer_window=(1, 2))
    a0 = np.asarray(setup.params["lora"]["wq"]["a"])
    state, _ = _train(setup, steps=5)
    b = np.asarray(state.params["lora"]["wq"]["b"])
    a = np.asarray(state.params["lora"]["wq"]["a"])
    self.assertTrue((b[0] == 0).all() and (b[2] == 0).all())
    np.testing.assert_array_equal(a[[0, 2]], a0[[0, 2]])
    self.assertGreater(np.abs(b[1]).max(), 0.0)

  def test_merged_export_equals_adapted_forward(self):
    model = _model()
    setup = lm.lora_setup(model, rank=4, targets=("q", "o", "up"))
    state, _ = _train(setup, steps=8)
    directory = tempfile.mkdtemp()
    written = setup.export(state, directory)
    merged = params_ckpt.restore_params(written["merged"])
    batch = jax.tree_util.tree_map(jnp.asarray, _data(model.cfg).batch(3))
    adapted, _ = setup.loss_fn(state.trainable, state.frozen, batch, None)
    plain, _ = lm.full_setup(model).loss_fn(merged, None, batch, None)
    np.testing.assert_allclose(float(plain), float(adapted), rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
