"""LoRA (lacax.model.lora): identity at init, merge / unmerge, parity with Hugging Face peft, labels."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch

from lacax.cache.kv_cache import init_cache
from lacax.model import llama
from lacax.model import lora as lora_lib
from lacax.weights import hf
from tests import hf_models

_run = jax.jit(llama.run, static_argnames=("cfg",))
_ALL = tuple(llama.LORA_TARGETS)


def _model(arch="llama3_rope_untied"):
  path, model = hf_models.saved_model(arch)
  cfg, params = hf.load_hf_checkpoint(path)
  return cfg, jax.tree.map(jnp.asarray, params), model


def _randomize_b(lora, key, std=0.05):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      std * jax.random.normal(k, x.shape) if jax.tree_util.keystr(p).endswith("['b']") else x
      for (p, x), k in zip(leaves, keys)])


class LoraTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.cfg, self.params, self.model = _model()
    rng = np.random.RandomState(0)
    self.tokens = jnp.asarray(rng.randint(0, self.cfg.vocab_size, (2, 10)), jnp.int32)
    self.positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))

  def test_zero_init_is_bit_identical(self):
    lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=_ALL)
    lora = lora_lib.init_lora(lcfg, self.params, jax.random.PRNGKey(0))
    self.assertEqual(lora["wo"]["a"].shape, (self.cfg.num_layers, 4, 16, 4))
    self.assertEqual(lora["wq"]["b"].shape, (self.cfg.num_layers, 4, 4, 16))
    self.assertGreater(float(jnp.max(jnp.abs(lora["wq"]["a"]))), 0.0)
    for cache in (None, init_cache(self.cfg, 2, 12)):
      plain = _run(self.params, self.tokens, self.positions, cache, cfg=self.cfg)
      got = _run(self.params, self.tokens, self.positions, cache, cfg=self.cfg, options=lora_lib.options(lcfg, lora))
      np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(plain.logits))

  def test_merged_equals_unmerged_and_unmerge_restores_the_base(self):
    lcfg = lora_lib.LoraConfig(rank=3, alpha=6.0, targets=_ALL)
    lora = _randomize_b(lora_lib.init_lora(lcfg, self.params, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
    adapted = _run(self.params, self.tokens, self.positions, None, cfg=self.cfg,
                   options=lora_lib.options(lcfg, lora)).logits
    plain = _run(self.params, self.tokens, self.positions, None, cfg=self.cfg).logits
    self.assertGreater(float(jnp.max(jnp.abs(adapted - plain))), 1e-2)  # the adapter does something
    merged = lora_lib.merge(self.params, lora, lcfg)
    got = _run(merged, self.tokens, self.positions, init_cache(self.cfg, 2, 12), cfg=self.cfg).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(adapted), atol=2e-5, rtol=0)
    restored = lora_lib.unmerge(merged, lora, lcfg)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(self.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)

  def test_matches_peft_on_a_tiny_hugging_face_llama(self):
    lcfg = lora_lib.LoraConfig(rank=4, alpha=12.0, targets=_ALL)
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=[n.split(".")[-1] for n in lora_lib.HF_NAMES.values()])
    torch.manual_seed(3)
    model = peft.get_peft_model(self.model, pcfg).eval()
    try:
      with torch.no_grad():
        ref = model(torch.tensor(np.asarray(self.tokens))).logits.numpy()
        base = model.get_base_model()
        with model.disable_adapter():
          ref_plain = model(torch.tensor(np.asarray(self.tokens))).logits.numpy()
      self.assertGreater(np.abs(ref - ref_plain).max(), 1e-2)
      lora = lora_lib.from_peft(model.state_dict(), self.cfg, lcfg)
      got = _run(self.params, self.tokens, self.positions, None, cfg=self.cfg,
                 options=lora_lib.options(lcfg, lora)).logits
      np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
      del base
    finally:
      model.unload()  # hf_models caches the torch model: give it back without adapters

  def test_dropout_only_with_an_rng_and_gradients_reach_the_adapters(self):
    lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0, dropout=0.5, targets=("wq", "w_down"))
    lora = _randomize_b(lora_lib.init_lora(lcfg, self.params, jax.random.PRNGKey(4)), jax.random.PRNGKey(5))
    run = lambda rng: _run(self.params, self.tokens, self.positions, None, cfg=self.cfg,  # noqa: E731
                           options=lora_lib.options(lcfg, lora, rng)).logits
    evaluation = run(None)
    merged = _run(lora_lib.merge(self.params, lora, lcfg), self.tokens, self.positions, None, cfg=self.cfg).logits
    np.testing.assert_allclose(np.asarray(evaluation), np.asarray(merged), atol=2e-5)
    a, b = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    self.assertGreater(float(jnp.max(jnp.abs(a - evaluation))), 1e-3)

    def loss(lora_w):
      logits = llama.forward(self.params, self.tokens, self.positions, None, self.cfg,
                             options=lora_lib.options(lcfg, lora_w))[0]
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, self.tokens[..., None], -1)[..., 0])

    grads = jax.grad(loss)(lora)
    for name in ("wq", "w_down"):
      self.assertGreater(float(jnp.max(jnp.abs(grads[name]["a"]))), 0.0)
      self.assertGreater(float(jnp.max(jnp.abs(grads[name]["b"]))), 0.0)

  def test_labels_freeze_the_base(self):
    lcfg = lora_lib.LoraConfig(rank=2, targets=("wv",))
    lora = lora_lib.init_lora(lcfg, self.params, jax.random.PRNGKey(0))
    labels = lora_lib.param_labels(self.params, lora, train_base=("final_norm",))
    self.assertEqual(labels["params"]["layers"]["wq"], "frozen")
    self.assertEqual(labels["params"]["final_norm"], "adapter")
    self.assertEqual(set(jax.tree.leaves(labels["lora"])), {"adapter"})
    self.assertEqual(jax.tree.structure(labels["lora"]), jax.tree.structure(lora))

  def test_bad_config_is_named(self):
    with self.assertRaisesRegex(ValueError, r"LoraConfig.targets=\('q_proj',\)"):
      lora_lib.LoraConfig(targets=("q_proj",))
    with self.assertRaisesRegex(ValueError, r"LoraConfig.rank=0"):
      lora_lib.LoraConfig(rank=0)
    with self.assertRaisesRegex(ValueError, r"LoraConfig.dropout=1.0"):
      lora_lib.LoraConfig(dropout=1.0)
    with self.assertRaisesRegex(ValueError, r"no layers.0.self_attn.k_proj.lora_A.weight"):
      lora_lib.from_peft({}, self.cfg, lora_lib.LoraConfig(targets=("wk",)))


if __name__ == "__main__":
  absltest.main()
