"""The XLA:CPU decode-attention kernel (lacax/model/cpu_attention.cc) against its pure-JAX reference."""

import ctypes
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import init_cache, quantize_kv
from lacax.model import config as config_lib
from lacax.model import cpu_attention
from lacax.model import cpu_kernels
from lacax.model import llama
from lacax.model import rope as rope_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _stacked_inputs(seed, L, B, T, S, KV, G, hd, held):
  """A stacked cache with holes, empty slots and keys in the queries' future; row 1 has a padding query."""
  rng = np.random.RandomState(seed)
  q = jnp.asarray(rng.randn(B, T, KV, G, hd), jnp.float32)
  k_all = jnp.asarray(rng.randn(L, B, S, KV, hd), jnp.float32)
  v_all = jnp.asarray(rng.randn(L, B, S, KV, hd), jnp.float32)
  pos = np.full((L, B, S, KV), -1, np.int32)
  for l in range(L):
    for b in range(B):
      for h in range(KV):
        pos[l, b, :held[b], h] = np.sort(rng.choice(held[b] + 40, held[b], replace=False))
  last = pos.max(axis=(0, 2, 3))
  query_pos = np.full((B, T), -1, np.int32)
  for b in range(B):
    n = T if b == 0 else max(T - 1, 0)
    query_pos[b, :n] = last[b] - 5 - n + 1 + np.arange(n)  # some kept keys lie in the queries' future
  return q, k_all, v_all, jnp.asarray(pos), jnp.asarray(query_pos)


@absltest.skipUnless(_HAS_COMPILER, "no C++ compiler: lacax uses the pure-JAX path")
class CpuAttentionKernelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    cpu_attention.set_enabled(True)
    self.assertTrue(cpu_attention.available(), "a compiler is present, so the kernel must build")

  @parameterized.parameters(
      # seed, B, T, S, KV, G, hd, rotate, query dtype, cache dtype
      (0, 1, 1, 4224, 3, 3, 64, False, "float32", "float32"),
      (1, 1, 1, 4224, 3, 3, 64, True, "float32", "float32"),
      (2, 2, 1, 300, 2, 4, 32, True, "float32", "float32"),
      (3, 2, 2, 77, 1, 8, 128, False, "float32", "float32"),
      (4, 2, 3, 513, 4, 2, 64, True, "float32", "float32"),
      (5, 1, 1, 5, 2, 2, 64, False, "float32", "float32"),
      (6, 2, 1, 700, 3, 3, 64, True, "bfloat16", "bfloat16"),
      (7, 1, 2, 300, 2, 2, 128, False, "float32", "bfloat16"),
      (8, 2, 1, 65, 2, 2, 32, True, "bfloat16", "float32"),
      # bfloat16 queries and cache: with AVX-512 BF16, bfloat16 products (keys read in place, or rotated and
      # rounded; blocks and groups cut short; value slots in pairs, an odd one left)
      (13, 1, 1, 4224, 3, 3, 64, False, "bfloat16", "bfloat16"),
      (14, 2, 2, 77, 1, 8, 128, True, "bfloat16", "bfloat16"),
      (15, 2, 1, 301, 2, 4, 32, False, "bfloat16", "bfloat16"),
      (16, 1, 3, 5, 2, 2, 64, True, "bfloat16", "bfloat16"),
      # More than 64 query rows: the blocked (prefill) path.
      (9, 2, 40, 300, 3, 3, 64, True, "float32", "float32"),
      (10, 2, 33, 130, 2, 4, 32, False, "bfloat16", "bfloat16"),
      (11, 1, 20, 77, 1, 8, 128, True, "float32", "bfloat16"),
      (12, 2, 25, 200, 2, 7, 64, False, "float32", "float32"),  # 9 tokens of 7 heads per tile: 63 rows
  )
  def test_kernel_equals_reference(self, seed, B, T, S, KV, G, hd, rotate, q_dtype, cache_dtype):
    L = 3
    q, k_all, v_all, pos, query_pos = _stacked_inputs(seed, L, B, T, S, KV, G, hd, held=[S - 3, S // 2])
    q, k_all, v_all = q.astype(q_dtype), k_all.astype(cache_dtype), v_all.astype(cache_dtype)
    tables = ()
    if rotate:
      inv_freq = (1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
      cos, sin = rope_lib.rope_table(jnp.arange(S, dtype=jnp.int32), inv_freq)  # [S, hd]
      tables = (cos, sin)
    for layer in range(L):
      layer = jnp.int32(layer)
      got = jax.jit(lambda *a: cpu_attention._call(*a, rotate=rotate))(
          q, k_all, v_all, pos, query_pos, layer, *(tables or (jnp.zeros((1, hd)),) * 2))
      # The reference in float32 on the same (possibly bfloat16-rounded) values: the kernel's arithmetic.
      f32 = lambda x: x.astype(jnp.float32)
      want = llama._cached_layer_attention(f32(q), f32(k_all), f32(v_all), pos, query_pos, layer,
                                           *(tables or (None, None)))
      self.assertEqual(got.dtype, v_all.dtype)
      # Every query, padding included (both give the uniform distribution over all slots).
      if cache_dtype == "float32":
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
      elif q_dtype == "float32" or not cpu_attention.bf16_products():  # the result rounded to bfloat16
        np.testing.assert_allclose(np.asarray(f32(got)), np.asarray(want), atol=1e-3, rtol=2 ** -8)
      else:  # and the weights and rotated keys too (2^-9 relative each), as the model's own bfloat16 path does
        np.testing.assert_allclose(np.asarray(f32(got)), np.asarray(want), atol=2 ** -8, rtol=2 ** -8)

  @parameterized.parameters(
      # seed, B, T, S, KV, G, hd, rotate, query dtype: an int8 cache with per-token scales
      (30, 1, 1, 4224, 3, 3, 64, False, "float32"),
      (31, 2, 1, 300, 3, 3, 64, True, "float32"),
      (32, 2, 2, 77, 1, 8, 128, True, "bfloat16"),
      (33, 1, 1, 700, 3, 3, 64, False, "bfloat16"),
      (34, 2, 1, 65, 2, 2, 32, True, "bfloat16"),
      (35, 1, 3, 5, 2, 2, 64, True, "bfloat16"),
      (36, 2, 40, 300, 3, 3, 64, True, "float32"),  # blocked (prefill) path
      (37, 2, 33, 130, 2, 4, 32, False, "bfloat16"),
  )
  def test_int8_cache_equals_dequantized_reference(self, seed, B, T, S, KV, G, hd, rotate, q_dtype):
    """Keys and values read as int8 times their slot's scale: the reference on the dequantized layer (float32
    arithmetic), every query, padding included; the result in the queries' dtype."""
    L = 2
    q, k_all, v_all, pos, query_pos = _stacked_inputs(seed, L, B, T, S, KV, G, hd, held=[S - 3, S // 2])
    q = q.astype(q_dtype)
    (k_q, k_s), (v_q, v_s) = quantize_kv(k_all), quantize_kv(v_all)
    tables = (jnp.zeros((1, hd)),) * 2
    if rotate:
      inv_freq = (1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
      tables = rope_lib.rope_table(jnp.arange(S, dtype=jnp.int32), inv_freq)
    for layer in range(L):
      layer = jnp.int32(layer)
      got = jax.jit(lambda *a: cpu_attention._call(*a, rotate=rotate))(
          q, k_q, v_q, pos, query_pos, layer, *tables, k_s, v_s)
      self.assertEqual(got.dtype, q.dtype)
      want = llama._cached_layer_attention(q.astype(jnp.float32), k_q, v_q, pos, query_pos, layer,
                                           *(tables if rotate else (None, None)), k_s, v_s)
      got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want)
      if q_dtype == "float32":
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
      else:  # the result rounded to bfloat16, and with bfloat16 products the rotated keys too (2^-9 each)
        np.testing.assert_allclose(got, want, atol=2 ** -8, rtol=2 ** -8)

  def test_int8_dispatch_checks_its_scales(self):
    L, B, T, S, KV, G, hd = 2, 1, 1, 40, 2, 2, 64
    q, k_all, v_all, pos, query_pos = _stacked_inputs(40, L, B, T, S, KV, G, hd, held=[30])
    (k_q, k_s), (v_q, v_s) = quantize_kv(k_all), quantize_kv(v_all)
    call = lambda *a, **kw: cpu_attention.decode_attention(q, *a, pos, query_pos, jnp.int32(0),
                                                           llama._cached_layer_attention, **kw)
    with self.assertRaisesRegex(ValueError, "int8 cache takes k_scale and v_scale"):
      call(k_q, v_q)
    with self.assertRaisesRegex(ValueError, "k_scale"):
      call(k_all, v_all, k_scale=k_s, v_scale=v_s)
    want = llama._cached_layer_attention(q, k_q, v_q, pos, query_pos, jnp.int32(0), None, None, k_s, v_s)
    np.testing.assert_allclose(np.asarray(call(k_q, v_q, k_scale=k_s, v_scale=v_s)), np.asarray(want), atol=2e-6)
    with self.assertRaises(Exception):  # the kernel's own shape check: scales [L, B, S, KV]
      jax.jit(lambda *a: cpu_attention._call(*a, rotate=False))(
          q, k_q, v_q, pos, query_pos, jnp.int32(0), jnp.zeros((1, hd)), jnp.zeros((1, hd)), k_s[:, :, :-1],
          v_s).block_until_ready()

  def test_portable_build_computes_the_same(self):
    """Built without -march=native (the generic vector code; bfloat16 queries and caches in float32 products, as
    on CPUs without AVX-512 BF16), the decode path gives the reference's result, and the native one's."""
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    with mock.patch.dict(os.environ, {"LACAX_CACHE_DIR": tmp}):
      library = ctypes.CDLL(str(cpu_kernels.build(cpu_attention.SOURCE, flag_sets=(["-O3"],))))
    library.LacaxAttentionBf16Products.restype = ctypes.c_int
    self.assertEqual(library.LacaxAttentionBf16Products(), 0)
    jax.ffi.register_ffi_target("lacax_decode_attention_portable",
                                jax.ffi.pycapsule(library.LacaxDecodeAttention), platform="cpu")
    L, B, T, S, KV, G, hd = 2, 2, 1, 301, 3, 3, 64
    q, k_all, v_all, pos, query_pos = _stacked_inputs(21, L, B, T, S, KV, G, hd, held=[S - 3, S // 2])
    q, k_all, v_all = q.astype(jnp.bfloat16), k_all.astype(jnp.bfloat16), v_all.astype(jnp.bfloat16)
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
    cos, sin = rope_lib.rope_table(jnp.arange(S, dtype=jnp.int32), inv_freq)
    f32 = lambda x: np.asarray(x.astype(jnp.float32))
    for rotate in (False, True):
      args = (q, k_all, v_all, pos, query_pos, jnp.int32(1), cos, sin)
      call = cpu_attention._call  # pylint: disable=protected-access
      native, portable = call(*args, rotate=rotate), call(*args, rotate=rotate, target="lacax_decode_attention_portable")
      want = llama._cached_layer_attention(*(a.astype(jnp.float32) for a in (q, k_all, v_all)), pos, query_pos,
                                           jnp.int32(1), *((cos, sin) if rotate else (None, None)))
      np.testing.assert_allclose(f32(portable), f32(want), atol=1e-3, rtol=2 ** -8)
      np.testing.assert_allclose(f32(portable), f32(native), atol=2 ** -7, rtol=2 ** -7)
    # An int8 cache (the generic int8 widening): the dequantized reference.
    jax.ffi.register_ffi_target("lacax_decode_attention_int8_portable",
                                jax.ffi.pycapsule(library.LacaxDecodeAttentionInt8), platform="cpu")
    (k_q, k_s), (v_q, v_s) = quantize_kv(k_all), quantize_kv(v_all)
    args = (q, k_q, v_q, pos, query_pos, jnp.int32(1), cos, sin, k_s, v_s)
    portable = cpu_attention._call(*args, rotate=True, target="lacax_decode_attention_int8_portable")  # pylint: disable=protected-access
    want = llama._cached_layer_attention(q.astype(jnp.float32), k_q, v_q, pos, query_pos, jnp.int32(1), cos, sin,
                                         k_s, v_s)
    np.testing.assert_allclose(f32(portable), f32(want), atol=1e-3, rtol=2 ** -8)

  @parameterized.parameters((False, "float32"), (True, "float32"), (True, "bfloat16"))
  def test_blocked_prefill_of_a_causal_prompt_equals_reference(self, rotate, dtype):
    """A prompt written from slot 0 (slot = position): key blocks in a tile's future are skipped, blocks it
    sees whole are unmasked; row 1 is a shorter prompt with padding queries (position -1)."""
    L, B, T, KV, G, hd = 2, 2, 300, 3, 3, 64
    S = T + 20
    rng = np.random.RandomState(3)
    q = jnp.asarray(rng.randn(B, T, KV, G, hd), dtype)
    k_all = jnp.asarray(rng.randn(L, B, S, KV, hd), dtype)
    v_all = jnp.asarray(rng.randn(L, B, S, KV, hd), dtype)
    lengths = np.array([T, 171])
    t = np.arange(T)[None]
    query_pos = np.where(t < lengths[:, None], t, -1).astype(np.int32)
    pos = np.full((L, B, S, KV), -1, np.int32)
    for b in range(B):
      pos[:, b, :lengths[b]] = np.arange(lengths[b])[None, :, None]
    tables = (jnp.zeros((1, hd)),) * 2
    if rotate:
      inv_freq = (1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
      tables = rope_lib.rope_table(jnp.arange(S, dtype=jnp.int32), inv_freq)
    got = jax.jit(lambda *a: cpu_attention._call(*a, rotate=rotate))(
        q, k_all, v_all, jnp.asarray(pos), jnp.asarray(query_pos), jnp.int32(1), *tables)
    f32 = lambda x: x.astype(jnp.float32)
    want = llama._cached_layer_attention(f32(q), f32(k_all), f32(v_all), jnp.asarray(pos), jnp.asarray(query_pos),
                                         jnp.int32(1), *(tables if rotate else (None, None)))
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == "float32" else dict(atol=1e-3, rtol=2 ** -8)
    np.testing.assert_allclose(np.asarray(f32(got)), np.asarray(want), **tol)

  @parameterized.parameters("bfloat16", "float16", "float32")
  def test_cache_write_equals_the_scatter(self, dtype):
    rng = np.random.RandomState(0)
    L, B, S, KV, hd, T = 3, 2, 50, 2, 32, 3
    cache = jnp.asarray(rng.randn(L, B, S, KV, hd), dtype)
    update = jnp.asarray(rng.randn(B, T, KV, hd), jnp.float32)
    slots = jnp.asarray([[4, 5, 6], [7, 8, S]], jnp.int32)  # slot S: a padding token, dropped
    write = jax.jit(lambda c, u, l, s: cpu_attention.cache_write(c, u, l, s, llama._write_layer))
    got = write(cache, update, jnp.int32(1), slots)
    want = llama._write_layer(cache, update.astype(dtype), jnp.int32(1), slots)
    self.assertEqual(got.dtype, cache.dtype)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    self.assertIn("lacax_cache_write", write.lower(cache, update, jnp.int32(1), slots).as_text())

  def test_decode_attention_dispatch_has_the_reference_gradient(self):
    q, k_all, v_all, pos, query_pos = _stacked_inputs(0, 2, 1, 1, 40, 2, 2, 32, held=[35])

    def loss(q, k_all, fn):
      return jnp.sum(jnp.sin(fn(q, k_all, v_all, pos, query_pos, jnp.int32(1))))

    kernel = lambda *a: cpu_attention.decode_attention(*a, reference=llama._cached_layer_attention)
    reference = lambda *a: llama._cached_layer_attention(*a, None, None)
    got = jax.grad(loss, argnums=(0, 1))(q, k_all, kernel)
    want = jax.grad(loss, argnums=(0, 1))(q, k_all, reference)
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
    self.assertAlmostEqual(float(loss(q, k_all, kernel)), float(loss(q, k_all, reference)), places=4)


@absltest.skipUnless(_HAS_COMPILER, "no C++ compiler: lacax uses the pure-JAX path")
class CpuAttentionInForwardTest(parameterized.TestCase):
  """forward() picks the kernel for decode and gives the pure-JAX numbers."""

  def tearDown(self):
    cpu_attention.set_enabled(True)
    jax.clear_caches()
    super().tearDown()

  def _run(self, cfg, params, rope_mode, enabled, prompt_len=12, cache_dtype=None):
    """(logits of a prefill of `prompt_len` tokens (row 1: 3 fewer) and 6 decode steps, whether the kernel is
    in the compiled decode step, whether it is in the compiled prefill)."""
    cpu_attention.set_enabled(enabled)
    jax.clear_caches()
    fwd = jax.jit(llama.forward, static_argnames="cfg")
    rng = np.random.RandomState(0)
    n = prompt_len
    prompt = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, n)), jnp.int32)
    positions = jnp.asarray(np.where(np.arange(n)[None] < np.array([[n], [n - 3]]), np.arange(n)[None], -1),
                            jnp.int32)
    cache = init_cache(cfg, 2, n + 28, rope_mode=rope_mode, dtype=cache_dtype)
    prefill_text = fwd.lower(params, prompt, positions, cache, cfg=cfg).as_text()
    logits, cache = fwd(params, prompt, positions, cache, cfg=cfg)
    steps = [np.asarray(logits)]
    next_pos = jnp.asarray([[n], [n - 3]], jnp.int32)
    for step in range(6):
      token = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 1)), jnp.int32)
      logits, cache = fwd(params, token, next_pos + step, cache, cfg=cfg)
      steps.append(np.asarray(logits))
    text = fwd.lower(params, token, next_pos, cache, cfg=cfg).as_text()
    return steps, "lacax_decode_attention" in text, "lacax_decode_attention" in prefill_text

  @parameterized.parameters(("slot", "float32", 12), ("stored", "float32", 12), ("slot", "bfloat16", 12),
                            ("slot", "float32", 90), ("stored", "bfloat16", 90))  # 90 tokens: 360 query rows
  def test_decode_logits_match_the_pure_jax_path(self, rope_mode, dtype, prompt_len):
    cfg = config_lib.ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_layers=3, num_heads=4,
                                 num_kv_heads=2, head_dim=64, dtype=dtype)
    params = llama.init_params(cfg, jax.random.PRNGKey(1), std=0.1)
    got, used, prefill_used = self._run(cfg, params, rope_mode, enabled=True, prompt_len=prompt_len)
    self.assertTrue(prefill_used)
    want, used_without, prefill_used_without = self._run(cfg, params, rope_mode, enabled=False,
                                                         prompt_len=prompt_len)
    self.assertTrue(used)
    self.assertFalse(used_without)
    self.assertFalse(prefill_used_without)
    for g, w in zip(got, want):
      if dtype == "float32":
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
      else:  # bfloat16 activations: the two paths round at different points
        np.testing.assert_allclose(g, w, atol=0.05 * np.abs(w).max())

  @parameterized.parameters(("slot", "float32", 12), ("stored", "bfloat16", 12), ("slot", "bfloat16", 90))
  def test_int8_cache_decode_logits_match_the_pure_jax_path(self, rope_mode, dtype, prompt_len):
    """An int8 KV cache (lacax.cache.int8): the kernel reads the int8 layer and its scales in prefill and decode;
    the pure-JAX path dequantizes the layer first."""
    cfg = config_lib.ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_layers=3, num_heads=4,
                                 num_kv_heads=2, head_dim=64, dtype=dtype)
    params = llama.init_params(cfg, jax.random.PRNGKey(2), std=0.1)
    got, used, prefill_used = self._run(cfg, params, rope_mode, enabled=True, prompt_len=prompt_len,
                                        cache_dtype=jnp.int8)
    self.assertTrue(used)
    self.assertTrue(prefill_used)
    want, used_without, _ = self._run(cfg, params, rope_mode, enabled=False, prompt_len=prompt_len,
                                      cache_dtype=jnp.int8)
    self.assertFalse(used_without)
    for g, w in zip(got, want):
      if dtype == "float32":
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
      else:  # the reference dequantizes to bfloat16 and rounds the weights; the kernel keeps float32
        np.testing.assert_allclose(g, w, atol=0.05 * np.abs(w).max())

  def test_not_used_where_it_does_not_apply(self):
    cfg = config_lib.ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=16)  # head_dim 16: not compiled
    params = llama.init_params(cfg, jax.random.PRNGKey(1), std=0.1)
    _, used, _ = self._run(cfg, params, "stored", enabled=True)
    self.assertFalse(used)
    self.assertFalse(cpu_attention.supports(1, 2, 2, 64, jnp.float32, jnp.float32, "original"))
    self.assertFalse(cpu_attention.supports(1, 2, 2, 64, jnp.float16, jnp.float16, "slot"))
    self.assertTrue(cpu_attention.supports(64, 2, 2, 64, jnp.float32, jnp.float32, "slot"))  # prefill rows
    self.assertTrue(cpu_attention.supports(1, 2, 2, 64, jnp.bfloat16, jnp.int8, "slot"))  # int8 cache
    self.assertFalse(cpu_attention.supports(1, 2, 2, 64, jnp.int8, jnp.int8, "slot"))
    self.assertFalse(cpu_attention.supports(8, 1, 65, 64, jnp.float32, jnp.float32, "slot"))  # 65 heads per kv


_FAKE_COMPILER = """#!/bin/sh
# A stand-in C++ compiler for the kernel-cache tests: `--version` prints a fixed line; a build copies the
# library that the real compiler built ($GOOD_LIBRARY) to the -o path, in two halves with $PAUSE seconds
# between them, so that a test can kill the build half-way.
if [ "$1" = "--version" ]; then echo "fake c++ 1.0"; exit 0; fi
while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done
size=$(wc -c < "$GOOD_LIBRARY")
head -c $((size / 2)) "$GOOD_LIBRARY" > "$out"
sleep "${PAUSE:-0}"
cat "$GOOD_LIBRARY" > "$out"
"""


@absltest.skipUnless(_HAS_COMPILER, "no C++ compiler: lacax uses the pure-JAX path")
class KernelCacheTest(absltest.TestCase):
  """A truncated, corrupt or half-built cached kernel is rebuilt (or bypassed with the documented warning)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cpu_attention.set_enabled(True)
    cls.good = cpu_attention.KERNELS.build()  # the real build in the default cache (a hit after the tests above)
    cls.good_bytes = cls.good.read_bytes()

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    compiler = os.path.join(self.root, "fakecxx")
    with open(compiler, "w") as f:
      f.write(_FAKE_COMPILER)
    os.chmod(compiler, 0o755)
    self.enter_context(mock.patch.dict(os.environ, {"LACAX_CACHE_DIR": self.root, "CXX": compiler,
                                                    "GOOD_LIBRARY": str(self.good), "PAUSE": "0"}))
    self.kernels = Path(self.root) / "kernels"

  def build_dirs(self):
    return sorted(p.name for p in self.kernels.iterdir())

  def assert_working(self, library: Path, load: bool = True):
    self.assertEqual(library.read_bytes(), self.good_bytes)
    if not load:  # a library this process has mapped must not be corrupted in place afterwards
      return
    loaded = ctypes.CDLL(str(library))
    for symbol in ("LacaxDecodeAttention", "LacaxDecodeAttentionInt8", "LacaxCacheWrite"):
      self.assertTrue(hasattr(loaded, symbol), symbol)

  def corrupt_and_rebuild(self, corrupt):
    first = cpu_attention.KERNELS.build()
    self.assert_working(first, load=False)
    corrupt(first)
    with self.assertLogs(level="WARNING") as logs:
      again = cpu_attention.KERNELS.build()
    self.assertEqual(again, first)
    self.assertLen(logs.output, 1)
    self.assertIn("lacax: cached CPU kernel is corrupt, rebuilding it", logs.output[0])
    self.assertIn(str(first.parent), logs.output[0])
    self.assert_working(again)
    self.assertEqual([d for d in self.build_dirs() if not d.startswith("cpu_attention-")], [])
    return logs.output[0]

  def test_truncated_kernel_is_rebuilt(self):
    message = self.corrupt_and_rebuild(lambda lib: os.truncate(lib, lib.stat().st_size // 3))
    self.assertIn(f"has {len(self.good_bytes) // 3} bytes, its manifest records {len(self.good_bytes)}", message)

  def test_corrupt_bytes_are_rebuilt(self):
    def flip(lib):
      data = bytearray(lib.read_bytes())
      data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
      lib.write_bytes(bytes(data))

    message = self.corrupt_and_rebuild(flip)
    self.assertIn("does not match the SHA-256", message)

  def test_missing_manifest_is_rebuilt(self):
    message = self.corrupt_and_rebuild(lambda lib: (lib.parent / "manifest.json").unlink())
    self.assertIn("unreadable or incomplete", message)

  def test_a_build_killed_half_way_leaves_nothing_that_is_used(self):
    env = dict(os.environ, PAUSE="60")
    child = subprocess.Popen([sys.executable, "-c", "from lacax.model import cpu_attention as c; c.KERNELS.build()"],
                             env=env, cwd=_REPO)
    try:
      deadline = time.time() + 120
      half = None
      while time.time() < deadline and half is None:  # wait until the compiler wrote its first half
        time.sleep(0.2)
        found = list(self.kernels.glob(".partial-*/lib.so")) if self.kernels.exists() else []
        if found and found[0].stat().st_size > 0:
          half = found[0]
    finally:
      child.kill()
      child.wait()
    self.assertIsNotNone(half, "the child build never started")
    self.assertLess(half.stat().st_size, len(self.good_bytes))
    self.assertEqual([d for d in self.build_dirs() if d.startswith("cpu_attention-")], [])
    # The next build ignores the leftover (it may belong to a running build) and builds afresh...
    library = cpu_attention.KERNELS.build()
    self.assert_working(library, load=False)
    self.assertTrue(half.exists())
    # ... and once the leftover is an hour old, a build deletes it.
    old = time.time() - 2 * 3600
    os.utime(half.parent, (old, old))
    shutil.rmtree(library.parent)
    self.assert_working(cpu_attention.KERNELS.build())
    self.assertFalse(half.parent.exists())

  def test_corrupt_kernel_without_a_compiler_falls_back_with_one_warning(self):
    first = cpu_attention.KERNELS.build()
    os.truncate(first, 100)
    state = dict(cpu_attention.KERNELS._state)
    cpu_attention.KERNELS._state.update(built=None)
    try:
      with mock.patch.object(cpu_kernels, "_compiler", return_value=None), \
          self.assertLogs(level="WARNING") as logs:
        self.assertFalse(cpu_attention.available())
    finally:
      cpu_attention.KERNELS._state.clear()
      cpu_attention.KERNELS._state.update(state)
    self.assertLen(logs.output, 1)
    self.assertIn("lacax: CPU decode-attention kernel unavailable, using the pure-JAX path (no C++ compiler",
                  logs.output[0])


if __name__ == "__main__":
  absltest.main()
