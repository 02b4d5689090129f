"""Logits parity with Hugging Face transformers on tiny random models, plus the model's error paths."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch

from lacax import generate as generation
from lacax.cache.kv_cache import init_cache
from lacax.cache.full import FullPolicy
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.weights import hf
from tests import hf_models

_forward = jax.jit(llama.forward, static_argnames=("cfg",))


def _load(arch):
  path, model = hf_models.saved_model(arch)
  cfg, params = hf.load_hf_checkpoint(path)
  return cfg, jax.tree.map(jnp.asarray, params), model


class ParityTest(parameterized.TestCase):

  @parameterized.named_parameters(
      [(a, a, "slot") for a in hf_models.ARCHITECTURES]
      + [(f"{a}_post_rope_keys", a, "stored") for a in hf_models.ARCHITECTURES])
  def test_prefill_and_cached_decode_match_transformers(self, arch, rope_mode):
    cfg, params, model = _load(arch)
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
      ref = model(torch.tensor(tokens)).logits.numpy()
    self.assertGreater(np.abs(ref).max(), 0.1)  # random weights large enough for a meaningful comparison

    positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    logits, _ = _forward(params, jnp.asarray(tokens), positions, init_cache(cfg, 2, 32, rope_mode=rope_mode),
                         cfg=cfg)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)

    # Prefill 10 tokens, then feed the rest one at a time through the cache.
    cache = init_cache(cfg, 2, 32, rope_mode=rope_mode)
    logits, cache = _forward(params, jnp.asarray(tokens[:, :10]), positions[:, :10], cache, cfg=cfg)
    step_logits = [np.asarray(logits)]
    for t in range(10, 24):
      logits, cache = _forward(params, jnp.asarray(tokens[:, t:t + 1]), positions[:, t:t + 1], cache, cfg=cfg)
      step_logits.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.length), 24)

  @parameterized.named_parameters(
      [(a, a, "slot") for a in hf_models.ARCHITECTURES] + [("llama3_rope_untied_post_rope_keys", "llama3_rope_untied", "stored")])
  def test_greedy_generation_matches_transformers(self, arch, rope_mode):
    cfg, params, model = _load(arch)
    prompts = [[5, 17, 3, 99, 42, 7], [11, 2], [64, 8, 9, 10]]
    result = generation.generate(params, cfg, prompts, max_new_tokens=16, bucket=8,
                                 policy=FullPolicy(rope_mode=rope_mode))
    for prompt, got in zip(prompts, result.tokens):
      with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
      self.assertEqual(got, ref[0, len(prompt):].tolist())

  def test_bfloat16_close_to_float32(self):
    cfg, params, _ = _load("llama_tied")
    cfg16 = cfg.replace(dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (1, 16)))
    positions = jnp.arange(16, dtype=jnp.int32)[None]
    ref, _ = _forward(params, tokens, positions, init_cache(cfg, 1, 16), cfg=cfg)
    got, cache = _forward(params16, tokens, positions, init_cache(cfg16, 1, 16), cfg=cfg16)
    self.assertEqual(cache.k.dtype, jnp.bfloat16)
    self.assertLess(float(jnp.max(jnp.abs(got - ref))), 0.05 * float(jnp.max(jnp.abs(ref))))


class UncachedForwardTest(parameterized.TestCase):
  """`forward(..., cache=None)`: teacher-forced scoring and training without a KV cache."""

  @parameterized.named_parameters([(a, a) for a in hf_models.ARCHITECTURES])
  def test_matches_transformers_and_the_cached_forward(self, arch):
    cfg, params, model = _load(arch)
    tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
      ref = model(torch.tensor(tokens)).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20))
    got, cache = _forward(params, jnp.asarray(tokens), positions, None, cfg=cfg)
    self.assertIsNone(cache)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
    cached, _ = _forward(params, jnp.asarray(tokens), positions, init_cache(cfg, 2, 32), cfg=cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(cached), atol=2e-6, rtol=0)

  def test_padding_anywhere_leaves_real_tokens_unchanged(self):
    cfg, params, _ = _load("llama_tied")
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (1, 12)), jnp.int32)
    positions = jnp.arange(12, dtype=jnp.int32)[None]
    want, _ = _forward(params, tokens, positions, None, cfg=cfg)
    # The same row with 3 padding tokens in front and 2 inside (token ids arbitrary, positions -1).
    padded_tokens = jnp.concatenate([jnp.full((1, 3), 7), tokens[:, :5], jnp.full((1, 2), 9), tokens[:, 5:]], 1)
    padded_pos = jnp.concatenate([jnp.full((1, 3), -1), positions[:, :5], jnp.full((1, 2), -1), positions[:, 5:]],
                                 1).astype(jnp.int32)
    got, _ = _forward(params, padded_tokens, padded_pos, None, cfg=cfg)
    real = np.asarray(padded_pos[0]) >= 0
    self.assertTrue(np.all(np.isfinite(np.asarray(got))))
    np.testing.assert_allclose(np.asarray(got)[0, real], np.asarray(want)[0], atol=2e-6, rtol=0)

  def test_long_sequence_takes_the_blocked_path_and_equals_the_cached_forward(self):
    cfg = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
    T = 2 * llama._BLOCK_Q + 5
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (1, T)), jnp.int32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    got, _ = _forward(params, tokens, positions, None, cfg=cfg)
    want, _ = _forward(params, tokens, positions, init_cache(cfg, 1, T), cfg=cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=1e-5)

  def test_gradient_matches_finite_differences(self):
    cfg = config_lib.ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                 num_kv_heads=1, head_dim=8)
    params = llama.init_params(cfg, jax.random.PRNGKey(1), std=0.3)
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, 50, (2, 9)), jnp.int32)
    positions = jnp.asarray([list(range(9)), list(range(6)) + [-1] * 3], jnp.int32)

    def loss(p):
      logits, _ = llama.forward(p, tokens[:, :-1], positions[:, :-1], None, cfg)
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      mask = (positions[:, 1:] >= 0).astype(jnp.float32)
      return jnp.sum(nll * mask) / jnp.sum(mask)

    grads = jax.jit(jax.grad(loss))(params)
    direction = jax.tree.map(lambda g: g / (jnp.linalg.norm(g.ravel()) + 1e-12), grads)
    eps = 1e-3
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)  # noqa: E731
    numeric = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    self.assertGreater(float(analytic), 1e-3)
    np.testing.assert_allclose(float(numeric), float(analytic), rtol=2e-2)


class AttentionFormulationsTest(parameterized.TestCase):
  """The slot-major (decode) and blocked (long prefill) formulations equal the explicit softmax."""

  def _inputs(self, seed, B, T, S, KV, G, hd, held):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, T, KV, G, hd), jnp.float32)
    k = jnp.asarray(rng.randn(B, S, KV, hd), jnp.float32)
    v = jnp.asarray(rng.randn(B, S, KV, hd), jnp.float32)
    # Slots hold increasing positions with holes (evicted tokens), then empty slots; per-head sets differ.
    key_pos = np.full((B, S, KV), -1, np.int32)
    for b in range(B):
      for h in range(KV):
        key_pos[b, :held[b], h] = np.sort(rng.choice(held[b] + 40, held[b], replace=False))
    last = key_pos.max(axis=(1, 2))
    query_pos = np.full((B, T), -1, np.int32)
    for b in range(B):  # the queries are the newest tokens of the row; row 1 is right-padded
      n = T if b == 0 else T // 2
      query_pos[b, :n] = last[b] - n + 1 + np.arange(n)
    return q, k, v, jnp.asarray(key_pos), jnp.asarray(query_pos)

  @parameterized.parameters((1, 3, 2), (1, 37, 3))
  def test_slot_major_decode_equals_explicit(self, seed, S, KV):
    q, k, v, key_pos, query_pos = self._inputs(seed, 2, 1, S, KV, 2, 8, held=[S, S - 1])
    got, probs = llama._attention_slot_major(q, k, v, key_pos, query_pos)
    want, want_probs = llama.attention(q, k, v, key_pos, query_pos, probs_hook=lambda p: p)  # explicit path
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(want_probs), atol=1e-6)

  @parameterized.parameters((0, 50, 70, 16, 32), (1, 64, 64, 16, 16), (2, 33, 90, 8, 64))
  def test_blocked_equals_explicit_on_real_queries(self, seed, T, S, block_q, block_s):
    q, k, v, key_pos, query_pos = self._inputs(seed, 2, T, S, 2, 3, 8, held=[S, S // 2])
    got = llama.attention_blocked(q, k, v, key_pos, query_pos, block_q=block_q, block_s=block_s)
    want, _ = llama.attention(q, k, v, key_pos, query_pos, probs_hook=lambda p: p)
    real = np.asarray(query_pos) >= 0
    self.assertTrue(np.all(np.isfinite(np.asarray(got))))
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)

  def test_long_prefill_uses_blocks_and_matches_a_token_by_token_decode(self):
    cfg = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
    T = 2 * llama._BLOCK_Q + 17
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (1, T)), jnp.int32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    logits, _ = _forward(params, tokens, positions, init_cache(cfg, 1, T + 3), cfg=cfg)
    cache = init_cache(cfg, 1, T + 3)
    chunk = 64  # small chunks take the explicit path
    steps = []
    for start in range(0, T, chunk):
      out, cache = _forward(params, tokens[:, start:start + chunk], positions[:, start:start + chunk], cache,
                            cfg=cfg)
      steps.append(np.asarray(out))
    np.testing.assert_allclose(np.asarray(logits), np.concatenate(steps, axis=1), atol=2e-4, rtol=1e-5)


class ShapesTest(absltest.TestCase):

  def test_llama3_8b_eval_shape_allocates_nothing(self):
    cfg = config_lib.LLAMA3_8B
    shapes = llama.param_shapes(cfg)
    n_params = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes))
    self.assertEqual(n_params, cfg.num_params())
    self.assertBetween(n_params, 8.0e9, 8.1e9)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 32768))
    logits, cache = jax.eval_shape(
        lambda p, c: llama.forward(p, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), c, cfg),
        shapes, cache)
    self.assertEqual(logits.shape, (1, 1, cfg.vocab_size))
    self.assertEqual(cache.k.shape, (32, 1, 32768, 8, 128))
    self.assertEqual(cfg.kv_bytes_per_token(), 131072)


class EmbeddingRowsTest(absltest.TestCase):

  def test_16bit_rows_gathered_without_a_float32_table(self):
    """bfloat16 / float16 rows are gathered as their bits: the same rows and derivative as table[tokens], and a
    loop that reads one row per step holds no float32 copy of the table (XLA:CPU's float normalisation of the
    gather, hoisted out of the loop, made one before)."""
    rng = np.random.default_rng(0)
    V, D = 96, 40
    tokens = jnp.asarray([[3, 95, 0, 3]], jnp.int32)
    for dtype in (jnp.bfloat16, jnp.float16):
      table = jnp.asarray(rng.normal(size=(V, D)), dtype)
      np.testing.assert_array_equal(np.asarray(llama.embed_tokens(table, tokens, dtype), np.float32),
                                    np.asarray(table[tokens], np.float32))
      w = jnp.asarray(rng.normal(size=(1, 4, D)), jnp.float32)
      got = jax.grad(lambda t: jnp.sum(llama.embed_tokens(t, tokens, jnp.float32) * w))(table)
      want = jax.grad(lambda t: jnp.sum(t[tokens].astype(jnp.float32) * w))(table)
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))

      def loop(table, token):
        body = lambda i, acc: acc + llama.embed_tokens(table, token + i, jnp.float32)  # noqa: E731
        return jax.lax.fori_loop(0, 5, body, jnp.zeros((1, D), jnp.float32))
      hlo = jax.jit(loop).lower(table, jnp.asarray([2], jnp.int32)).compile().as_text()
      self.assertFalse(f"f32[{V},{D}]" in hlo, f"the compiled loop holds a float32 copy of the {dtype} table")


class BadInputTest(absltest.TestCase):

  def _copy(self, arch):
    path, _ = hf_models.saved_model(arch)
    dst = os.path.join(tempfile.mkdtemp(), "copy")
    shutil.copytree(path, dst)
    return dst

  def _rewrite_tensors(self, path, edit):
    from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})

  def test_missing_tensor_is_named(self):
    path = self._copy("mistral")
    self._rewrite_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with self.assertRaisesRegex(hf.CheckpointError, r"model\.layers\.1\.self_attn\.k_proj\.weight"):
      hf.load_hf_checkpoint(path)

  def test_misshaped_tensor_is_named_with_shapes(self):
    path = self._copy("mistral")

    def edit(t):
      t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.2.mlp.up_proj.weight"][:-1]

    self._rewrite_tensors(path, edit)
    with self.assertRaisesRegex(hf.CheckpointError,
                                r"model\.layers\.2\.mlp\.up_proj\.weight.*\(95, 64\).*expected \(96, 64\)"):
      hf.load_hf_checkpoint(path)

  def test_unsupported_architecture_is_named(self):
    path = self._copy("llama_tied")
    with open(os.path.join(path, "config.json")) as f:
      hf_config = json.load(f)
    hf_config["model_type"] = "gpt_neox"
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(hf_config, f)
    with self.assertRaisesRegex(ValueError, "model_type='gpt_neox'"):
      hf.load_hf_checkpoint(path)

  def test_prompt_longer_than_cache_is_rejected(self):
    cfg, params, _ = _load("llama_tied")
    with self.assertRaisesRegex(ValueError, r"prompt length 40 \+ max_new_tokens 8 = 48 .*capacity 32"):
      generation.generate(params, cfg, [[1] * 40], max_new_tokens=8, policy=FullPolicy(capacity=32))

  def test_unknown_config_field_is_named(self):
    with self.assertRaisesRegex(ValueError, r"unknown ModelConfig field\(s\) \['num_layer'\]"):
      config_lib.SMOLLM2_135M.replace(num_layer=3)

  def test_invalid_config_values_are_named(self):
    with self.assertRaisesRegex(ValueError, r"num_heads=9 must be a multiple of num_kv_heads=2"):
      config_lib.SMOLLM2_135M.replace(num_kv_heads=2)
    with self.assertRaisesRegex(ValueError, r"dtype='float8'"):
      config_lib.SMOLLM2_135M.replace(dtype="float8")

  def test_out_of_vocab_prompt_is_rejected(self):
    cfg, params, _ = _load("llama_tied")
    with self.assertRaisesRegex(ValueError, r"prompt token ids must be in \[0, 113\)"):
      generation.generate(params, cfg, [[1, 500]], max_new_tokens=2)


if __name__ == "__main__":
  absltest.main()
