"""The one forward's extension points (`lacax.model.llama.ForwardOptions`): identities, exact depth / width
semantics, hidden states against Hugging Face, the quantized-weight plug point, and the CPU kernel path."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch

from lacax.cache.kv_cache import init_cache
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.model import quantized
from lacax.weights import hf
from tests import hf_models

_run = jax.jit(llama.run, static_argnames=("cfg",))

_CFG = config_lib.ModelConfig(vocab_size=80, hidden_size=64, intermediate_size=48, num_layers=3, num_heads=4,
                              num_kv_heads=2, head_dim=32)


def _params(cfg=_CFG, seed=0):
  return llama.init_params(cfg, jax.random.PRNGKey(seed), std=0.25)


def _inputs(cfg=_CFG, B=2, T=9, seed=0):
  tokens = jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (B, T)), jnp.int32)
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  positions[1, T - 3:] = -1  # a right-padded row
  return tokens, jnp.asarray(positions)


def _zero_lora(params, r=3):
  """LoRA on every target with random A and zero B (the identity adapter)."""
  layers = params["layers"]
  L = layers["wq"].shape[0]
  key = jax.random.PRNGKey(7)
  out = {}
  for name in llama.LORA_TARGETS:
    w = layers[name]
    n_in = 2 if name == "wo" else 1
    key, sub = jax.random.split(key)
    out[name] = {"a": jax.random.normal(sub, (L, *w.shape[1:1 + n_in], r)),
                 "b": jnp.zeros((L, r, *w.shape[1 + n_in:]))}
  return out


class _Scale:
  scale, dropout = 2.0, 0.0


def _decode_steps(params, cfg, tokens, positions, options, rope_mode="slot", score_mode=None):
  """Prefill, then two single-token decode steps; every output of every step."""
  cache = init_cache(cfg, tokens.shape[0], 16, rope_mode=rope_mode, score_mode=score_mode)
  outs = []
  out = _run(params, tokens, positions, cache, cfg=cfg, options=options)
  outs.append(out)
  nxt = jnp.max(positions, axis=1, keepdims=True) + 1
  for step in range(2):
    out = _run(params, tokens[:, step:step + 1], nxt + step, out.cache, cfg=cfg, options=options)
    outs.append(out)
  return outs


class IdentityTest(parameterized.TestCase):
  """Every extension at its identity value gives bit-identical logits (and caches)."""

  @parameterized.named_parameters(("slot", "slot", None), ("stored_scores", "stored", "accumulate"),
                                  ("original_window", "original", "window:2"), ("uncached", None, None))
  def test_identity_options_are_bit_identical(self, rope_mode, score_mode):
    params = _params()
    tokens, positions = _inputs()
    L, H, F = _CFG.num_layers, _CFG.num_heads, _CFG.intermediate_size
    identity = llama.ForwardOptions(
        layer_gate=jnp.ones((L,)), head_mask=jnp.ones((L, H)), ffn_mask=jnp.ones((F,)),
        lora=_zero_lora(params), lora_config=_Scale(), layers=tuple(range(L)), hidden_layers=(0, 2, L))
    if rope_mode is None:
      plain = _run(params, tokens, positions, None, cfg=_CFG)
      got = _run(params, tokens, positions, None, cfg=_CFG, options=identity)
      np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(plain.logits))
      return
    plain = _decode_steps(params, _CFG, tokens, positions, None, rope_mode, score_mode)
    got = _decode_steps(params, _CFG, tokens, positions, identity, rope_mode, score_mode)
    for a, b in zip(plain, got):
      np.testing.assert_array_equal(np.asarray(b.logits), np.asarray(a.logits))
      for x, y in zip(jax.tree.leaves(a.cache), jax.tree.leaves(b.cache)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))

  def test_forward_is_run(self):
    params = _params()
    tokens, positions = _inputs()
    logits, cache = llama.forward(params, tokens, positions, init_cache(_CFG, 2, 12), _CFG)
    out = llama.run(params, tokens, positions, init_cache(_CFG, 2, 12), _CFG)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(out.logits))
    self.assertIsNone(out.hidden)


class DepthAndWidthTest(parameterized.TestCase):

  def _drop_layer(self, params, layer):
    keep = [i for i in range(_CFG.num_layers) if i != layer]
    return {**params, "layers": jax.tree.map(lambda a: a[np.asarray(keep)], params["layers"])}

  @parameterized.parameters(None, "slot")
  def test_gated_off_layer_equals_static_skip_equals_removed_layer(self, rope_mode):
    params = _params()
    tokens, positions = _inputs()
    cache = lambda cfg: None if rope_mode is None else init_cache(cfg, 2, 12, rope_mode=rope_mode)  # noqa: E731
    gated = _run(params, tokens, positions, cache(_CFG), cfg=_CFG,
                 options=llama.ForwardOptions(layer_gate=jnp.asarray([1.0, 0.0, 1.0])))
    static = _run(params, tokens, positions, cache(_CFG), cfg=_CFG, options=llama.ForwardOptions(layers=(0, 2)))
    small_cfg = _CFG.replace(num_layers=2)
    removed = _run(self._drop_layer(params, 1), tokens, positions, cache(small_cfg), cfg=small_cfg)
    np.testing.assert_array_equal(np.asarray(static.logits), np.asarray(removed.logits))
    np.testing.assert_allclose(np.asarray(gated.logits), np.asarray(removed.logits), atol=1e-6, rtol=0)
    full = _run(params, tokens, positions, cache(_CFG), cfg=_CFG)
    self.assertGreater(float(jnp.max(jnp.abs(full.logits - removed.logits))), 1e-2)  # the layer mattered
    if rope_mode is not None:  # a statically skipped layer leaves its cache layer untouched
      np.testing.assert_array_equal(np.asarray(static.cache.pos[1]), -1)
      np.testing.assert_array_equal(np.asarray(static.cache.length[1]), 0)

  def test_traced_gate_skips_the_layer_without_a_cache(self):
    """Without a cache the off layer is a branch of a `cond` (not computed)."""
    params = _params()
    tokens, positions = _inputs()
    gate = jnp.asarray([1.0, 0.0, 1.0])
    uncached = jax.make_jaxpr(lambda g: llama.run(params, tokens, positions, None, _CFG,
                                                  options=llama.ForwardOptions(layer_gate=g)).logits)(gate)
    self.assertIn("cond[", str(uncached))
    # Gradients flow through the kept layers only.
    loss = lambda p: jnp.sum(llama.run(p, tokens, positions, None, _CFG,  # noqa: E731
                                       options=llama.ForwardOptions(layer_gate=gate)).logits ** 2)
    grads = jax.grad(loss)(params)["layers"]["wq"]
    self.assertEqual(float(jnp.abs(grads[1]).max()), 0.0)
    self.assertGreater(float(jnp.abs(grads[0]).max()), 0.0)

  def test_head_mask_of_a_kv_group_equals_the_sliced_model(self):
    params = _params()
    tokens, positions = _inputs()
    # Heads 2, 3 form kv group 1 (G = 2): masking both equals a model without that kv head.
    mask = jnp.asarray([1.0, 1.0, 0.0, 0.0])
    got = _run(params, tokens, positions, None, cfg=_CFG, options=llama.ForwardOptions(head_mask=mask))
    lay = params["layers"]
    sliced = {**lay, "wq": lay["wq"][:, :, :2], "wk": lay["wk"][:, :, :1], "wv": lay["wv"][:, :, :1],
              "wo": lay["wo"][:, :2]}
    small_cfg = _CFG.replace(num_heads=2, num_kv_heads=1)
    want = _run({**params, "layers": sliced}, tokens, positions, None, cfg=small_cfg)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=2e-6, rtol=0)

  def test_ffn_mask_equals_sliced_channels_and_masks_are_traced(self):
    params = _params()
    tokens, positions = _inputs()
    keep = np.arange(_CFG.intermediate_size) % 3 != 1
    mask = jnp.asarray(np.tile(keep, (_CFG.num_layers, 1)), jnp.float32)
    compiled = jax.jit(lambda m: llama.run(params, tokens, positions, None, _CFG,
                                           options=llama.ForwardOptions(ffn_mask=m)).logits)
    got = compiled(mask)
    lay = params["layers"]
    sliced = {**lay, "w_gate": lay["w_gate"][:, :, keep], "w_up": lay["w_up"][:, :, keep],
              "w_down": lay["w_down"][:, keep]}
    small_cfg = _CFG.replace(intermediate_size=int(keep.sum()))
    want = _run({**params, "layers": sliced}, tokens, positions, None, cfg=small_cfg)
    # The masked down-projection sums zeros the sliced one does not have, so the reduction order differs: on an AMD
    # EPYC one logit of 1440 (about 3.7) differed by 2.6e-6, a few float32 ulps; 1e-5 is about 20 ulps there.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want.logits), atol=1e-5, rtol=0)
    # Another shape runs in the same compiled program.
    other = compiled(jnp.ones_like(mask))
    np.testing.assert_allclose(np.asarray(other), np.asarray(_run(params, tokens, positions, None, cfg=_CFG).logits),
                               atol=1e-5, rtol=0)
    self.assertEqual(compiled._cache_size(), 1)

  def test_bad_option_shapes_are_named(self):
    params = _params()
    tokens, positions = _inputs()
    with self.assertRaisesRegex(ValueError, r"ForwardOptions.head_mask has shape \(3,\); expected \(4,\) or \(3, 4\)"):
      llama.run(params, tokens, positions, None, _CFG, options=llama.ForwardOptions(head_mask=jnp.ones(3)))
    with self.assertRaisesRegex(ValueError, r"ForwardOptions.layers=\(2, 0\)"):
      llama.run(params, tokens, positions, None, _CFG, options=llama.ForwardOptions(layers=(2, 0)))
    with self.assertRaisesRegex(ValueError, r"ForwardOptions.lora targets \['w_qkv'\]"):
      llama.run(params, tokens, positions, None, _CFG,
                options=llama.ForwardOptions(lora={"w_qkv": {}}, lora_config=_Scale()))


class HiddenStatesTest(absltest.TestCase):

  def test_hidden_states_match_transformers(self):
    path, model = hf_models.saved_model("llama3_rope_untied")
    cfg, params = hf.load_hf_checkpoint(path)
    params = jax.tree.map(jnp.asarray, params)
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
      ref = model(torch.tensor(tokens), output_hidden_states=True)
    L = cfg.num_layers
    positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))
    out = _run(params, jnp.asarray(tokens), positions, init_cache(cfg, 2, 16), cfg=cfg,
               options=llama.ForwardOptions(hidden_layers=tuple(range(L + 1))))
    self.assertEqual(out.hidden.shape, (L + 1, 2, 11, cfg.hidden_size))
    for j in range(L):  # HF's last entry is after the final norm; lacax returns the residual stream
      np.testing.assert_allclose(np.asarray(out.hidden[j]), ref.hidden_states[j].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(llama.unembed(params, out.hidden[L], cfg)), np.asarray(out.logits),
                               atol=1e-6, rtol=0)
    no_logits = _run(params, jnp.asarray(tokens), positions, None, cfg=cfg,
                     options=llama.ForwardOptions(hidden_layers=(L,), logits=False))
    self.assertIsNone(no_logits.logits)
    np.testing.assert_allclose(np.asarray(no_logits.hidden[0]), np.asarray(out.hidden[L]), atol=1e-5, rtol=0)

  def test_skipped_layers_pass_the_hidden_state_through(self):
    params = _params()
    tokens, positions = _inputs()
    out = _run(params, tokens, positions, None, cfg=_CFG,
               options=llama.ForwardOptions(layers=(0, 2), hidden_layers=(1, 2, 3)))
    np.testing.assert_array_equal(np.asarray(out.hidden[0]), np.asarray(out.hidden[1]))  # layer 1 skipped
    self.assertGreater(float(jnp.max(jnp.abs(out.hidden[2] - out.hidden[1]))), 1e-3)


class QuantizedPlugPointTest(absltest.TestCase):

  def test_int8_weights_equal_their_dequantized_dense_model(self):
    params = llama.init_params(_CFG, jax.random.PRNGKey(0), std=0.1)
    tokens, positions = _inputs()
    q_params = quantized.quantize_layers(params)
    self.assertIsInstance(q_params["layers"]["wq"], quantized.Int8Weight)
    self.assertEqual(q_params["layers"]["wq"].values.dtype, jnp.int8)
    dense = {**params, "layers": {k: v.dense() if isinstance(v, quantized.Int8Weight) else v
                                  for k, v in q_params["layers"].items()}}
    for cache in (None, init_cache(_CFG, 2, 12)):
      got = _run(q_params, tokens, positions, cache, cfg=_CFG)
      want = _run(dense, tokens, positions, cache, cfg=_CFG)
      np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5, rtol=0)
    full = np.asarray(_run(params, tokens, positions, None, cfg=_CFG).logits)
    real = np.asarray(positions) >= 0
    err = float(np.max(np.abs(np.asarray(got.logits) - full)[real]))
    self.assertBetween(err, 1e-6, 0.05 * float(np.max(np.abs(full[real]))))  # quantized: close, not equal


class CpuKernelPathTest(absltest.TestCase):

  def test_decode_with_options_still_lowers_to_the_custom_call(self):
    from lacax.model import cpu_attention  # pylint: disable=g-import-not-at-top

    cpu_attention.set_enabled(True)
    self.assertTrue(cpu_attention.available(), "the test environment has a C++ compiler: the kernel must build")
    params = _params()
    L, H, F = _CFG.num_layers, _CFG.num_heads, _CFG.intermediate_size
    cache = init_cache(_CFG, 2, 64)
    tok, pos = jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32)
    options = llama.ForwardOptions(layer_gate=jnp.ones((L,)), head_mask=jnp.ones((L, H)), ffn_mask=jnp.ones((F,)),
                                   lora=_zero_lora(params), lora_config=_Scale())
    for opts in (None, options):
      hlo = jax.jit(llama.run, static_argnames=("cfg",)).lower(params, tok, pos, cache, cfg=_CFG,
                                                               options=opts).as_text()
      self.assertIn("lacax_decode_attention", hlo)
    hooked = options.replace(probs_hook=lambda p, i: p)  # a hook needs the probabilities: no kernel
    hlo = jax.jit(llama.run, static_argnames=("cfg",)).lower(params, tok, pos, cache, cfg=_CFG,
                                                             options=hooked).as_text()
    self.assertNotIn("lacax_decode_attention", hlo)


if __name__ == "__main__":
  absltest.main()
