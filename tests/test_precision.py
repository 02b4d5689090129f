"""Low-precision products with float32 accumulation (`lacax.model.precision`) and mixed-precision training.

What is asserted: `lowp_einsum`'s forward equals the einsum of the cast operands (bit for bit on CPU), its
gradients come back in the operands' own dtypes and match float32 autodiff to bfloat16 accuracy, and its backward
products are themselves bfloat16 (the compiled program holds no float32 x float32 dot); `project` keeps the old
numbers for bfloat16 models; `ForwardOptions.dot_dtype` over float32 weights equals the forward of the
bfloat16-cast weights to bfloat16 accuracy; the Llama losses with a compute dtype take float32 master weights
uncast, return float32 gradients and learn; the step refuses a conflicting `TrainConfig.compute_dtype`.
"""

from __future__ import annotations

import re

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.model import precision
from lacax.train import data as data_lib
from lacax.train import lm, loop, losses, optim
from lacax.train import state as st
from lacax.weights.loader import Model
from tests import train_utils as tu

BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)
EQUATIONS = (("btd,df->btf", (2, 5, 8), (8, 12)), ("btd,dhk->bthk", (2, 5, 8), (8, 3, 4)),
             ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 8)), ("btd,vd->btv", (2, 5, 8), (16, 8)))


def _operands(x_shape, w_shape, dtype, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(kx, x_shape, jnp.float32).astype(dtype),
          jax.random.normal(kw, w_shape, jnp.float32).astype(dtype))


class LowpEinsumTest(parameterized.TestCase):

  @parameterized.parameters(*EQUATIONS)
  def test_forward_equals_einsum_of_cast_operands(self, eq, xs, ws):
    x, w = _operands(xs, ws, jnp.float32)
    got = precision.lowp_einsum(eq, x, w, BF16, F32)
    want = jnp.einsum(eq, x.astype(BF16), w.astype(BF16), preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    self.assertEqual(precision.lowp_einsum(eq, x, w, BF16, BF16).dtype, BF16)

  @parameterized.parameters(*EQUATIONS)
  def test_gradients_in_operand_dtypes_close_to_float32(self, eq, xs, ws):
    x, w = _operands(xs, ws, jnp.float32, seed=1)
    probe = jax.random.normal(jax.random.PRNGKey(2), jnp.einsum(eq, x, w).shape)

    def loss(f):
      return lambda x, w: jnp.sum(f(x, w) * probe)

    dx, dw = jax.grad(loss(lambda x, w: precision.lowp_einsum(eq, x, w, BF16, F32)), (0, 1))(x, w)
    rx, rw = jax.grad(loss(lambda x, w: jnp.einsum(eq, x, w)), (0, 1))(x, w)
    self.assertEqual((dx.dtype, dw.dtype), (F32, F32))
    for got, want in ((dx, rx), (dw, rw)):
      scale = float(jnp.max(jnp.abs(want)))
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.03 * scale)
    # bfloat16 operands get bfloat16 gradients; mixed operands each their own.
    xb, wb = x.astype(BF16), w.astype(BF16)
    gx, gw = jax.grad(loss(lambda x, w: precision.lowp_einsum(eq, x, w, BF16, F32)), (0, 1))(xb, w)
    self.assertEqual((gx.dtype, gw.dtype), (BF16, F32))
    del wb

  def test_backward_products_are_low_precision(self):
    x, w = _operands((4, 6, 8), (8, 12), jnp.float32)
    fn = jax.jit(jax.grad(lambda x, w: jnp.sum(precision.lowp_einsum("btd,df->btf", x, w, BF16, F32) ** 2),
                          (0, 1)))
    hlo = fn.lower(x, w).as_text()
    dots = re.findall(r"stablehlo\.dot_general[^\n]*", hlo)
    self.assertLen(dots, 3)  # forward, d/dx, d/dw
    for line in dots:
      self.assertRegex(line, r"\(tensor<[0-9x]*xbf16>, tensor<[0-9x]*xbf16>\) -> tensor<[0-9x]*xf32>")

  def test_equation_that_reduces_one_operand_is_refused(self):
    x, w = _operands((2, 3), (3, 4), jnp.float32)
    with self.assertRaisesRegex(ValueError, r"lowp_einsum equation 'ab,cd->ad'.*first operand"):
      jax.grad(lambda x: jnp.sum(precision.lowp_einsum("ab,cd->ad", x, w.T[:, :3].T, BF16, F32)))(x)


class ProjectTest(absltest.TestCase):

  def test_bfloat16_model_keeps_its_numbers(self):
    x, w = _operands((2, 5, 8), (8, 12), jnp.bfloat16)
    got = llama.project(x, w, "btd,df->btf")
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(jnp.einsum("btd,df->btf", x, w), np.float32))
    self.assertEqual(got.dtype, BF16)

  def test_float32_without_dot_dtype_is_the_plain_einsum(self):
    x, w = _operands((2, 5, 8), (8, 12), jnp.float32)
    np.testing.assert_array_equal(np.asarray(llama.project(x, w, "btd,df->btf")),
                                  np.asarray(jnp.einsum("btd,df->btf", x, w)))

  def test_float32_dot_dtype_multiplies_bfloat16_operands_in_float32(self):
    x, w = _operands((2, 5, 8), (8, 12), jnp.bfloat16)
    got = llama.project(x, w, "btd,df->btf", dot_dtype="float32")
    want = jnp.einsum("btd,df->btf", x.astype(jnp.float32), w.astype(jnp.float32)).astype(jnp.bfloat16)
    self.assertEqual(got.dtype, BF16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    x32 = x.astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(llama.project(x32, w.astype(jnp.float32), "btd,df->btf",
                                                           dot_dtype="float32")),
                                  np.asarray(jnp.einsum("btd,df->btf", x32, w.astype(jnp.float32))))

  def test_dot_dtype_forward_matches_bfloat16_weights(self):
    cfg = tu.tiny_llama_cfg()
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % cfg.vocab_size, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    mixed, _ = llama.forward(params, tokens, positions, None, cfg,
                             options=llama.ForwardOptions(dot_dtype="bfloat16"))
    plain, _ = llama.forward(params, tokens, positions, None, cfg)
    cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    ref, _ = llama.forward(cast, tokens, positions, None, cfg)  # float32 stream over bfloat16-rounded weights
    self.assertFalse(np.array_equal(np.asarray(mixed), np.asarray(plain)))
    scale = float(jnp.max(jnp.abs(plain)))
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(ref), atol=0.02 * scale)
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(plain), atol=0.05 * scale)

  def test_bad_dot_dtype_names_the_field(self):
    cfg = tu.tiny_llama_cfg()
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    with self.assertRaisesRegex(ValueError, r"ForwardOptions.dot_dtype='int8'"):
      llama.forward(params, tokens, jnp.arange(4)[None], None, cfg, options=llama.ForwardOptions(dot_dtype="int8"))


class MixedPrecisionTrainingTest(parameterized.TestCase):

  def _model(self):
    cfg = tu.tiny_llama_cfg()
    return Model(cfg=cfg, params=llama.init_params(cfg, jax.random.PRNGKey(0)), tokenizer=None, source="random")

  def _batch(self, cfg):
    ids = np.tile(np.arange(7) * 13 % cfg.vocab_size, 60)
    return data_lib.pack_ids(ids, seq_len=24, batch_size=4)

  def _setup(self, model, mode, compute_dtype):
    if mode == "full":
      return lm.full_setup(model, compute_dtype=compute_dtype)
    return lm.lora_setup(model, rank=4, alpha=8.0, targets=("q", "v", "down"), compute_dtype=compute_dtype)

  def _fit(self, setup, ds, compute_dtype, steps=30):
    opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=3), steps)
    state = st.create_train_state(setup.params, opt, labels=setup.labels)
    trainer = loop.Trainer(setup.loss_fn, opt, loop.TrainConfig(steps=steps, compute_dtype=compute_dtype,
                                                                progress=False), schedule=sched, labels=setup.labels)
    state, records = trainer.fit(state, ds.batch)
    return state, [r["loss"] for r in records if "loss" in r]

  @parameterized.parameters("full", "lora")
  def test_master_weights_float32_gradients_float32_and_it_learns(self, mode):
    model = self._model()
    setup = self._setup(model, mode, "bfloat16")
    self.assertEqual(setup.loss_fn.compute_dtype, "bfloat16")
    self.assertEqual(setup.cfg.dtype, model.cfg.dtype)  # the residual stream stays float32
    ds = self._batch(model.cfg)
    trainable, frozen = st.partition(setup.params, setup.labels)
    grads = jax.grad(lambda tr: setup.loss_fn(tr, frozen, jax.tree.map(jnp.asarray, ds.batch(0)), None)[0]
                     )(trainable)
    for g in jax.tree_util.tree_leaves(grads):
      self.assertEqual(g.dtype, F32)
    state, mixed = self._fit(setup, ds, "bfloat16")
    for x in jax.tree_util.tree_leaves(state.trainable):
      self.assertEqual(x.dtype, F32)
    _, plain = self._fit(self._setup(model, mode, ""), ds, "")
    self.assertNotEqual(mixed[0], plain[0])  # the products really ran in bfloat16
    self.assertLess(np.mean(mixed[-5:]), 0.97 * np.mean(mixed[:5]))
    self.assertAlmostEqual(np.mean(mixed[-5:]), np.mean(plain[-5:]), delta=0.05 * plain[0])

  def test_conflicting_compute_dtype_is_refused(self):
    setup = lm.full_setup(self._model(), compute_dtype="bfloat16")
    with self.assertRaisesRegex(ValueError, r"train.compute_dtype='float16' but the loss computes in 'bfloat16'"):
      loop.make_grad_fn(setup.loss_fn, compute_dtype=jnp.float16)
    self.assertIsNone(loop.param_cast_dtype(setup.loss_fn, jnp.bfloat16))
    self.assertEqual(loop.param_cast_dtype(losses.llama_loss_fn(setup.cfg), jnp.bfloat16), jnp.bfloat16)

  def test_bad_compute_dtype_names_the_field(self):
    with self.assertRaisesRegex(ValueError, r"train.activation_dtype='int8'"):
      lm.full_setup(self._model(), activation_dtype="int8")

  def test_accuracy_counts_the_maximum_logit(self):
    logits = jnp.asarray([[[0.0, 2.0, 1.0], [3.0, 3.0, 0.0], [0.0, 0.0, 5.0]]])
    loss, aux = losses.next_token_loss(logits, jnp.asarray([[1, 1, 0]]), jnp.ones((1, 3)))
    self.assertAlmostEqual(float(aux["accuracy"]), 2 / 3, places=6)  # a tie for the maximum counts
    want = -np.mean([jax.nn.log_softmax(logits[0, i])[t] for i, t in enumerate([1, 1, 0])])
    self.assertAlmostEqual(float(loss), float(want), places=5)


if __name__ == "__main__":
  absltest.main()
