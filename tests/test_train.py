"""The training loop: learning, gradient accumulation, freezing, mixed precision, optimizers, checkpoints.

Model-agnostic parts run on a small MLP regressor (tests/train_utils.py); the language-model loss on a tiny Llama.
Resume after a kill is in test_train_resume.py, sharded training in test_train_sharding.py.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.train import checkpoint as ckpt_lib
from lacax.train import data as data_lib
from lacax.train import losses, loop, optim
from lacax.train import state as st
from tests import train_utils as tu


def _fit(steps=40, accum=1, labels_kw=None, ocfg=None, batch_fn=None, compute_dtype="", params=None, **fit_kw):
  params = tu.mlp_params() if params is None else params
  ocfg = ocfg or optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1)
  opt, sched = optim.make_optimizer(ocfg, steps)
  labels = st.make_labels(params, **(labels_kw or {}))
  state = st.create_train_state(params, opt, labels=labels)
  trainer = loop.Trainer(tu.mlp_loss, opt, loop.TrainConfig(steps=steps, accum_steps=accum, progress=False,
                                                             log_every=10, compute_dtype=compute_dtype),
                         schedule=sched, labels=labels)
  state, records = trainer.fit(state, batch_fn or tu.regression_batch, **fit_kw)
  return state, records, trainer


class LoopTest(parameterized.TestCase):

  def test_loss_falls_on_learnable_task(self):
    run_dir = tempfile.mkdtemp()
    held_out = [tu.regression_batch(10_000 + i, 64) for i in range(2)]
    params = tu.mlp_params()
    opt, _ = optim.make_optimizer(optim.OptimizerConfig(), 1)
    before = loop.Trainer(tu.mlp_loss, opt, loop.TrainConfig(steps=1)).evaluate(
        st.create_train_state(params, opt), held_out)["loss"]
    state, records, trainer = _fit(steps=150, run_dir=run_dir, eval_batches=held_out)
    after = trainer.evaluate(state, held_out)["loss"]
    self.assertLess(after, 0.25 * before)
    # Metrics: one record per step plus the final evaluation, and the plot.
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    self.assertEqual([r["step"] for r in lines if "loss" in r], list(range(1, 151)))
    self.assertAlmostEqual(lines[-1]["eval_loss"], after, places=5)
    self.assertTrue(all(r["tokens_per_s"] > 0 for r in lines if "loss" in r))
    self.assertGreater(os.path.getsize(os.path.join(run_dir, "loss_curve.png")), 1000)
    self.assertEqual(int(state.step), 150)

  def test_accumulation_equals_larger_batch(self):
    # Uneven weights per micro-batch: the weighted accumulation must still give the big batch's gradient.
    batch_fn = lambda s: tu.regression_batch(s, 16, ragged=True)
    big, _, _ = _fit(steps=4, accum=1, batch_fn=batch_fn)
    acc, _, _ = _fit(steps=4, accum=4, batch_fn=batch_fn)
    chex.assert_trees_all_close(acc.trainable, big.trainable, rtol=2e-5, atol=2e-6)
    # The gradient itself, one step.
    params = tu.mlp_params()
    batch = jax.tree_util.tree_map(jnp.asarray, batch_fn(0))
    g1 = loop.make_grad_fn(tu.mlp_loss)(params, {}, batch, None)
    g4 = loop.make_grad_fn(tu.mlp_loss, accum_steps=4)(params, {}, batch, None)
    np.testing.assert_allclose(g4[0], g1[0], rtol=1e-6)
    self.assertEqual(float(g4[1]["weight"]), float(g1[1]["weight"]))
    # Four micro-batch sums in another order: a few float32 ulps of the largest gradient (~0.6) apart.
    chex.assert_trees_all_close(g4[2], g1[2], rtol=1e-5, atol=1e-6)

  def test_freeze_by_label_leaves_frozen_bit_identical(self):
    params = tu.mlp_params()
    state, _, _ = _fit(steps=5, params=params, labels_kw=dict(trainable=("layers/",), frozen=("layers/b",)))
    self.assertIsNone(state.trainable["w_in"])
    self.assertIsNone(state.trainable["layers"]["b"])
    full = state.params
    for name in ("w_in", "b_in", "w_out"):
      np.testing.assert_array_equal(full[name], params[name])
    np.testing.assert_array_equal(full["layers"]["b"], params["layers"]["b"])
    self.assertFalse(np.array_equal(full["layers"]["w"], params["layers"]["w"]))
    # No optimizer state for frozen leaves: only layers/w's moments.
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    self.assertEqual({x.shape for x in moments}, {params["layers"]["w"].shape})

  def test_layer_window_trains_only_its_rows(self):
    params = tu.mlp_params(layers=4)
    state, _, _ = _fit(steps=5, params=params, labels_kw=dict(layer_window=(1, 3)))
    w, w0 = np.asarray(state.params["layers"]["w"]), np.asarray(params["layers"]["w"])
    for row in (0, 3):  # outside the window: bit-identical despite weight decay and momentum
      np.testing.assert_array_equal(w[row], w0[row])
    for row in (1, 2):
      self.assertGreater(np.abs(w[row] - w0[row]).max(), 1e-4)
    np.testing.assert_array_equal(state.params["w_in"], params["w_in"])  # outside `layers`: frozen

  def test_labels_errors_name_the_field(self):
    params = tu.mlp_params()
    with self.assertRaisesRegex(ValueError, r"train.trainable pattern 'lora/' matches no parameter"):
      st.make_labels(params, trainable=("lora/",))
    with self.assertRaisesRegex(ValueError, r"train.layer_window=\(2, 9\)"):
      st.make_labels(params, layer_window=(2, 9))
    with self.assertRaisesRegex(ValueError, "leave nothing to train"):
      st.make_labels(params, trainable=("w_in",), frozen=("w_in",))

  def test_bfloat16_compute_float32_master(self):
    state, records, _ = _fit(steps=30, compute_dtype="bfloat16")
    for x in jax.tree_util.tree_leaves(state.trainable):
      self.assertEqual(x.dtype, jnp.float32)
    ref, ref_records, _ = _fit(steps=30)
    self.assertLess(records[-1]["loss"], 0.5 * records[0]["loss"])
    self.assertAlmostEqual(records[-1]["loss"], ref_records[-1]["loss"], delta=0.05 * ref_records[0]["loss"])
    # The loss really ran in bfloat16: the first losses differ from float32's in low bits.
    self.assertNotEqual(records[0]["loss"], ref_records[0]["loss"])

  def test_lm_loss_on_tiny_llama_learns_and_masks(self):
    cfg = tu.tiny_llama_cfg()
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    # A repeating sequence: learnable; the mask keeps only the second half of each row.
    ids = np.tile(np.arange(7) * 13 % cfg.vocab_size, 60)
    ds = data_lib.pack_ids(ids, seq_len=24, batch_size=4)
    loss_fn = losses.llama_loss_fn(cfg)
    opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=3), 40)
    state = st.create_train_state(params, opt)
    trainer = loop.Trainer(loss_fn, opt, loop.TrainConfig(steps=40, progress=False), schedule=sched)
    state, records = trainer.fit(state, ds.batch)
    self.assertLess(records[-1]["loss"], 0.3 * records[0]["loss"])
    # The loss equals a direct masked cross-entropy computed from the forward's logits.
    batch = ds.batch(0)
    batch["mask"][:, :12] = 0.0
    loss, aux = loss_fn(state.trainable, state.frozen, jax.tree_util.tree_map(jnp.asarray, batch), None)
    logits, _ = llama.forward(state.params, batch["tokens"], batch["positions"], None, cfg)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), nll[:, 12:].mean(), rtol=1e-5)
    self.assertEqual(float(aux["weight"]), 4 * 12)


class OptimTest(parameterized.TestCase):

  def test_warmup_cosine_schedule(self):
    c = optim.OptimizerConfig(learning_rate=1.0, schedule="warmup_cosine", warmup_steps=10, end_lr_ratio=0.1)
    s = optim.make_schedule(c, 110)
    self.assertEqual(float(s(0)), 0.0)
    self.assertAlmostEqual(float(s(10)), 1.0, places=6)
    self.assertAlmostEqual(float(s(60)), 0.55, places=5)  # halfway through the cosine
    self.assertAlmostEqual(float(s(110)), 0.1, places=6)
    const = optim.make_schedule(optim.OptimizerConfig(learning_rate=0.5, schedule="constant", warmup_steps=4), 10)
    self.assertEqual([float(const(i)) for i in (0, 2, 4, 9)], [0.0, 0.25, 0.5, 0.5])

  def test_clipping_bounds_the_update(self):
    c = optim.OptimizerConfig(name="sgd", learning_rate=1.0, schedule="constant", b1=0.0, clip_norm=0.5)
    opt, _ = optim.make_optimizer(c, 1)
    params = {"w": jnp.zeros(4)}
    updates, _ = opt.update({"w": jnp.full(4, 100.0)}, opt.init(params), params)
    np.testing.assert_allclose(float(jnp.linalg.norm(updates["w"])), 0.5, rtol=1e-6)

  def test_weight_decay_skips_vectors(self):
    c = optim.OptimizerConfig(learning_rate=0.1, schedule="constant", weight_decay=0.5, clip_norm=0.0)
    opt, _ = optim.make_optimizer(c, 1)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], np.zeros(2))

  @parameterized.parameters(
      (dict(name="lion"), "optimizer.name='lion'"),
      (dict(schedule="step"), "optimizer.schedule='step'"),
      (dict(learning_rate=0.0), "optimizer.learning_rate=0.0"),
      (dict(b2=1.0), "optimizer.b2=1.0"),
  )
  def test_bad_config_names_the_field(self, kw, msg):
    with self.assertRaisesRegex(ValueError, msg.replace("(", r"\(").replace(".", r"\.")):
      optim.OptimizerConfig(**kw)

  def test_config_section_unknown_field(self):
    with self.assertRaisesRegex(ValueError, r"unknown fields \['lr'\]"):
      optim.optimizer_config_from({"lr": 1e-3})
    with self.assertRaisesRegex(ValueError, r"optimizer.warmup_steps=10 must be < train.steps=10"):
      optim.make_schedule(optim.OptimizerConfig(warmup_steps=10), 10)


class CheckpointTest(absltest.TestCase):

  def _state(self, width=32):
    params = tu.mlp_params(width=width)
    opt, _ = optim.make_optimizer(optim.OptimizerConfig(), 10)
    return st.create_train_state(params, opt, labels=st.make_labels(params, trainable=("layers/", "w_out"))), opt

  def test_round_trip_and_keep_last(self):
    directory = tempfile.mkdtemp()
    state, opt = self._state()
    step = jax.jit(loop.make_train_step(tu.mlp_loss, opt, donate=False))
    ckpt = ckpt_lib.Checkpointer(directory, keep=2, config={"model": {"width": 32}})
    saved = {}
    for i in range(4):
      state, _ = step(state, jax.tree_util.tree_map(jnp.asarray, tu.regression_batch(i)))
      ckpt.save(state)
      saved[int(state.step)] = jax.device_get(state)
    ckpt.wait()
    self.assertEqual(ckpt.all_steps(), [3, 4])
    fresh, _ = self._state()
    restored = ckpt.restore(fresh)
    chex.assert_trees_all_equal(jax.device_get(restored), saved[4])
    restored3 = ckpt.restore(fresh, step=3)
    chex.assert_trees_all_equal(restored3.trainable, saved[3].trainable)
    ckpt.close()

  def test_shape_change_is_refused_naming_the_field(self):
    directory = tempfile.mkdtemp()
    state, _ = self._state(width=32)
    ckpt = ckpt_lib.Checkpointer(directory, config={"model": {"width": 32}, "optimizer": {"learning_rate": 1e-3}})
    ckpt.save(state)
    ckpt.close()
    other, _ = self._state(width=16)
    ckpt2 = ckpt_lib.Checkpointer(directory, config={"model": {"width": 16}, "optimizer": {"learning_rate": 1e-3}})
    with self.assertRaisesRegex(ValueError, r"model\.width: saved 32, now 16") as cm:
      ckpt2.restore(other)
    self.assertIn("trainable/layers/b: saved (3, 32), now (3, 16)", str(cm.exception))
    self.assertNotIn("learning_rate", str(cm.exception))

  def test_corrupted_checkpoint_names_the_directory(self):
    directory = tempfile.mkdtemp()
    state, _ = self._state()
    ckpt = ckpt_lib.Checkpointer(directory)
    ckpt.save(state)
    ckpt.close()
    step_dir = os.path.join(directory, "0", "state")
    # Truncate every data file of the array store.
    for root, _, files in os.walk(step_dir):
      for f in files:
        if not f.startswith("_") and "manifest" not in f:
          with open(os.path.join(root, f), "wb") as fh:
            fh.write(b"\0garbage")
    with self.assertRaisesRegex(ckpt_lib.CheckpointError, os.path.join(directory, "0") + " is corrupted"):
      ckpt_lib.Checkpointer(directory).restore(state)
    # Metadata gone: also a clear error.
    os.remove(os.path.join(directory, "0", "meta", "metadata"))
    with self.assertRaisesRegex(ckpt_lib.CheckpointError, os.path.join(directory, "0")):
      ckpt_lib.Checkpointer(directory).restore(state)


class DataTest(absltest.TestCase):

  def test_packing_targets_are_next_tokens_and_batches_are_pure(self):
    ids = np.arange(1000) % 97
    ds = data_lib.pack_ids(ids, seq_len=16, batch_size=5, seed=3)
    self.assertEqual(ds.num_rows, (1000 - 1) // 16)
    b = ds.batch(7)
    np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
    self.assertTrue((b["mask"] == 1).all())
    np.testing.assert_array_equal(b["positions"], np.tile(np.arange(16), (5, 1)))
    chex.assert_trees_all_equal(ds.batch(7), data_lib.pack_ids(ids, seq_len=16, batch_size=5, seed=3).batch(7))
    # One epoch visits every row exactly once.
    n = ds.num_rows
    rows = np.concatenate([ds.rows_at(s) for s in range(n // 5)])
    self.assertEqual(len(set(rows.tolist())), len(rows))

  def test_default_text_dataset(self):
    tok = tu.byte_tokenizer()
    ds = data_lib.text_dataset(tok, "", seq_len=64, batch_size=2, max_chars=5000)
    self.assertEqual(ds.num_rows, (5000 - 1) // 64)
    text = tok.decode(ds.ids[0])
    from lacax.eval import texts  # pylint: disable=g-import-not-at-top
    self.assertTrue(texts.default_text().startswith(text))

  def test_instruction_masks_cover_only_the_answer(self):
    tok = tu.byte_tokenizer()
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "output": "hi there"}]
    ds = data_lib.instruction_dataset(tok, records, seq_len=96, batch_size=2, seed=None)
    b = ds.batch(0)
    for row, answer in enumerate(["5", "hi there"]):
      masked = b["targets"][row][b["mask"][row] > 0]
      self.assertEqual(tok.decode(masked, skip_special_tokens=False), answer + "<|im_end|>\n")
      n = ds.lengths[row]
      self.assertTrue((b["positions"][row, n:] == -1).all())
      self.assertTrue((b["mask"][row, n - 1:] == 0).all())
    prompt = tok.decode(b["tokens"][0][b["positions"][0] >= 0], skip_special_tokens=False)
    self.assertTrue(prompt.startswith("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>"))

  def test_instruction_missing_field_names_record_and_field(self):
    path = os.path.join(tempfile.mkdtemp(), "alpaca.jsonl")
    with open(path, "w") as f:
      f.write(json.dumps({"instruction": "a", "output": "b"}) + "\n\n")
      f.write(json.dumps({"instruction": "c", "input": "d"}) + "\n")
    with self.assertRaisesRegex(ValueError, f"{path}, line 3: missing field 'output'"):
      data_lib.instruction_dataset(tu.byte_tokenizer(), path, seq_len=64, batch_size=1)
    path2 = os.path.join(tempfile.mkdtemp(), "alpaca.json")
    with open(path2, "w") as f:
      json.dump([{"instruction": "a", "output": "b"}, {"output": "x"}], f)
    with self.assertRaisesRegex(ValueError, f"{path2}, record 1: missing field 'instruction'"):
      data_lib.instruction_dataset(tu.byte_tokenizer(), path2, seq_len=64, batch_size=1)


if __name__ == "__main__":
  absltest.main()
