"""Wrapper policies (AdaKV, per-layer budgets, Chunk, ChunkKV, Composed, Decoding, PrefillDecoding, KeyRerotation)
against NumPy statements of their rules, the kvpress definitions of H2O and PyramidKV, the registry's validation,
and the fixes to the prompt compressors' decode cache (capacity = budget, lean decode, window-row recording)."""

from __future__ import annotations

import dataclasses
import functools

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache import plans, registry
from lacax.cache.adakv import AdaKVPolicy
from lacax.cache.chunk import ChunkPolicy, chunk_counts
from lacax.cache.chunkkv import ChunkKVPolicy, chunks_kept
from lacax.cache.composed import ComposedPolicy
from lacax.cache.decoding import DecodingPolicy
from lacax.cache.h2o import H2OPolicy
from lacax.cache.key_rerotation import KeyRerotationPolicy
from lacax.cache.kv_cache import init_cache
from lacax.cache.kvmerger import KVMergerPolicy
from lacax.cache.perlayer import PerLayerPolicy
from lacax.cache.prefill_decoding import PrefillDecodingPolicy
from lacax.cache.pyramidkv import PyramidKVPolicy, kvpress_pyramid_budgets
from lacax.cache.snapkv import SnapKVPolicy
from lacax.cache.streaming import StreamingPolicy
from lacax.cache.tova import TOVAPolicy
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.sampling import SamplingConfig

L, B, S, KV = 2, 2, 24, 3


def synth_cfg():
  return config_lib.ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=16, num_layers=L, num_heads=2 * KV,
                                num_kv_heads=KV, head_dim=8)


@functools.lru_cache(maxsize=None)
def tiny_model():
  cfg = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=8)
  return cfg, llama.init_params(cfg, jax.random.PRNGKey(0), std=0.1)


def synthetic(policy, counts, seed=0):
  """A prefilled-looking cache of `policy`: row b of layer l holds positions 0..counts[b]-1 in slots, random
  distinct scores; k[..., 0] encodes the position."""
  cfg = synth_cfg()
  rng = np.random.RandomState(seed)
  cache = policy.init(cfg, B, S)
  slot = np.arange(S)[None, None, :, None]
  pos = np.where(slot < np.asarray(counts)[None, :, None, None], slot, -1) * np.ones((L, 1, 1, KV), np.int32)
  k = np.zeros(cache.k.shape, np.float32)
  k[..., 0] = pos
  scores = rng.permutation(L * B * S * KV).reshape(L, B, S, KV).astype(np.float32) / (L * B * S * KV)
  length = np.max(np.sum(pos >= 0, axis=2), axis=-1).astype(np.int32)
  scores = jnp.asarray(scores) if cache.scores is not None else None
  return cache.replace(k=jnp.asarray(k), pos=jnp.asarray(pos, jnp.int32), length=jnp.asarray(length),
                       scores=scores)


def kept(cache):
  """{(l, b, h): sorted kept positions}."""
  pos = np.asarray(cache.pos)
  return {(l, b, h): sorted(int(p) for p in pos[l, b, :, h] if p >= 0)
          for l in range(pos.shape[0]) for b in range(pos.shape[1]) for h in range(pos.shape[3])}


def inner_np(inner, cache):
  scores, protected = inner.keep_scores(cache)
  return np.asarray(scores, np.float64), np.asarray(protected), np.asarray(cache.pos)


class WrapperRulesTest(parameterized.TestCase):

  @parameterized.parameters((0.2, 5), (0.0, 4), (1.0, 6))
  def test_adakv(self, alpha, budget):
    inner = H2OPolicy(heavy=budget - 2, recent=2)
    policy = AdaKVPolicy(inner, budget, alpha)
    counts = (20, 9)
    cache = synthetic(policy, counts)
    out = policy.compact(cache, capacity=S)
    scores, protected, pos = inner_np(inner, cache)
    n_safe = max(1, int(budget * alpha)) if alpha > 0 else 0
    got = kept(out)
    for l in range(L):
      for b in range(B):
        n = counts[b]
        if n <= budget:  # within budget: nothing to do
          for h in range(KV):
            self.assertEqual(got[l, b, h], list(range(n)))
          continue
        forced = set()
        for h in range(KV):
          order = sorted(range(n), key=lambda s: (-(np.inf if protected[l, b, s, h] else scores[l, b, s, h]), s))
          forced |= {(s, h) for s in order[:n_safe]} | {(s, h) for s in range(n) if protected[l, b, s, h]}
        rest = sorted(((s, h) for s in range(n) for h in range(KV) if (s, h) not in forced),
                      key=lambda sh: (-scores[l, b, sh[0], sh[1]], sh[0], sh[1]))
        chosen = forced | set(rest[:KV * budget - len(forced)])
        for h in range(KV):
          self.assertEqual(got[l, b, h], sorted(s for s, hh in chosen if hh == h), f"layer {l} row {b} head {h}")
        self.assertEqual(sum(len(got[l, b, h]) for h in range(KV)), KV * budget, "the layer budget is exact")
    bound = int(policy.max_held(synth_cfg(), 20)[0])
    self.assertEqual(bound, max(budget, KV * budget - (KV - 1) * n_safe))
    self.assertLessEqual(max(len(v) for v in got.values()), bound)

  def test_perlayer(self):
    inner = H2OPolicy(heavy=3, recent=2)
    policy = PerLayerPolicy(inner, (4, 9))
    cache = synthetic(policy, (20, 7))
    out = policy.compact(cache, capacity=12)
    scores, protected, _ = inner_np(inner, cache)
    for (l, b, h), keep in kept(out).items():
      n, budget = (20, 7)[b], (4, 9)[l]
      order = sorted(range(n), key=lambda s: (not protected[l, b, s, h], -scores[l, b, s, h], s))
      self.assertEqual(keep, sorted(order[:min(n, budget)]), f"layer {l} row {b} head {h}")
    np.testing.assert_array_equal(policy.max_held(synth_cfg(), 20), [4, 9])
    with self.assertRaisesRegex(ValueError, "PerLayer budgets has 3 entries but the model has 2 layers"):
      PerLayerPolicy(inner, (4, 5, 6)).init(synth_cfg(), 1, 8)

  @parameterized.parameters((5, 7), (8, 4), (30, 5))
  def test_chunk(self, chunk_length, budget):
    inner = SnapKVPolicy(8, 2, 3, lean_decode=False)
    policy = ChunkPolicy(inner, budget, chunk_length)
    counts = (23, 11)
    cache = synthetic(policy, counts)
    out = policy.compact(cache, capacity=S)
    scores, protected, _ = inner_np(inner, cache)
    for (l, b, h), keep in kept(out).items():
      n = counts[b]
      want = []
      for c, count in enumerate(chunk_counts(n, budget, chunk_length)):
        members = range(c * chunk_length, min(n, (c + 1) * chunk_length))
        order = sorted(members, key=lambda s: (not protected[l, b, s, h], -scores[l, b, s, h], s))
        want += order[:count]
      self.assertEqual(keep, sorted(want), f"layer {l} row {b} head {h}")
    self.assertEqual(int(policy.max_held(synth_cfg(), 23)[0]),
                     max(len(v) for (l, b, h), v in kept(out).items() if b == 0))

  @parameterized.parameters((4, 9), (5, 6), (30, 5))
  def test_chunkkv(self, chunk_length, budget):
    inner = SnapKVPolicy(8, 2, 3, lean_decode=False)
    policy = ChunkKVPolicy(inner, budget, chunk_length)
    counts = (23, 11)
    cache = synthetic(policy, counts)
    out = policy.compact(cache, capacity=S)
    scores, protected, _ = inner_np(inner, cache)
    ranked = np.where(protected, np.inf, scores)
    got = kept(out)
    for l in range(L):
      for b in range(B):
        n = counts[b]
        if n <= budget:
          want = {h: list(range(n)) for h in range(KV)}
        elif n < chunk_length:  # shorter than one chunk: the inner top-k per head
          want = {h: sorted(sorted(range(n), key=lambda s: (-ranked[l, b, s, h], s))[:budget]) for h in range(KV)}
        else:
          starts = range(0, n, chunk_length)
          means = [ranked[l, b, s:min(n, s + chunk_length)].sum(axis=-1).mean() for s in starts]
          top = sorted(range(len(means)), key=lambda c: (-means[c], c))[:chunks_kept(n, budget, chunk_length)]
          tokens = sorted(s for c in top for s in range(c * chunk_length, min(n, (c + 1) * chunk_length)))
          want = {h: tokens for h in range(KV)}
        for h in range(KV):
          self.assertEqual(got[l, b, h], want[h], f"layer {l} row {b} head {h}")
        self.assertLessEqual(len(got[l, b, 0]), int(policy.max_held(synth_cfg(), n)[l]))

  def test_composed_is_first_then_second(self):
    a, b = StreamingPolicy(2, 10), H2OPolicy(heavy=3, recent=3, rope_mode="slot")
    cache = synthetic(ComposedPolicy(a, b), (20, 15))
    both = ComposedPolicy(a, b).compact(cache)
    np.testing.assert_array_equal(both.pos, b.compact(a.compact(cache)).pos)
    reverse = ComposedPolicy(b, a).compact(cache)
    self.assertNotEqual(kept(both), kept(reverse), "order matters: H2O within the window differs from a window "
                                                   "over H2O's survivors")
    for (_, row, _), keep in kept(both).items():
      self.assertLessEqual(len(keep), 6)
      self.assertLessEqual(len(keep), (20, 15)[row])

  def test_composed_validation(self):
    with self.assertRaisesRegex(ValueError, "records score_mode='accumulate' but second=TOVAPolicy needs 'last'"):
      ComposedPolicy(H2OPolicy(2, 2), TOVAPolicy(4))
    with self.assertRaisesRegex(ValueError, "first rope_mode='slot' differs from second rope_mode='original'"):
      ComposedPolicy(StreamingPolicy(2, 4), H2OPolicy(2, 2))
    with self.assertRaisesRegex(ValueError, "both keep a policy state"):
      ComposedPolicy(SnapKVPolicy(8, 2), SnapKVPolicy(6, 2)).init_state(synth_cfg())


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def _stream(params, cache, tokens, *, cfg, policy):
  def step(cache, inputs):
    token, position = inputs
    _, cache = llama.forward(params, token[:, None], position[:, None], cache, cfg)
    cache = policy.compact(cache)
    return cache, plans.occupancy(cache)

  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return jax.lax.scan(step, cache, (tokens.T, positions.T))


class DecodingTest(parameterized.TestCase):

  def test_decoding_compresses_every_interval_to_the_target(self):
    cfg, params = tiny_model()
    inner = H2OPolicy(heavy=4, recent=2)
    policy = DecodingPolicy(inner, target_size=8, compression_interval=5)
    steps = 32
    cache = policy.init(cfg, 2, policy.decode_capacity(cfg, steps))
    self.assertEqual(cache.capacity, 13)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, steps)), jnp.int32)
    _, held = jax.device_get(_stream(params, cache, tokens, cfg=cfg, policy=policy))
    want, n = [], 0
    for t in range(1, steps + 1):
      n += 1
      if t % 5 == 0:
        n = min(n, 8)
      want.append(n)
    np.testing.assert_array_equal(held[:, 0, 0, 0], want)
    self.assertTrue(np.all(held == np.asarray(want)[:, None, None, None]))

  def test_compression_ratio_target_is_a_fraction_of_the_tokens_seen(self):
    # kvpress's CompressionRatioDecodingPress: every interval, keep max(1, int(seen * (1 - r))) tokens.
    cfg, params = tiny_model()
    policy = DecodingPolicy(H2OPolicy(heavy=4, recent=2), target_size=8, compression_interval=5,
                            target_compression_ratio=0.7)
    steps = 40
    self.assertEqual(policy.decode_capacity(cfg, steps), 12 + 5)  # int(40 * 0.3) + the interval
    cache = policy.init(cfg, 2, policy.decode_capacity(cfg, steps))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, steps)), jnp.int32)
    _, held = jax.device_get(_stream(params, cache, tokens, cfg=cfg, policy=policy))
    want, n = [], 0
    for t in range(1, steps + 1):
      n += 1
      if t % 5 == 0:
        n = min(n, max(1, t * 3 // 10))
      want.append(n)
    self.assertTrue(np.all(held == np.asarray(want)[:, None, None, None]), held[:, 0, 0, 0])
    built = registry.make_policy("decoding", {"size": 8, "inner": "h2o", "target_compression_ratio": 0.5,
                                              "compression_interval": 16})
    self.assertEqual((built.target_compression_ratio, built.run_capacity(cfg, 100, 28)), (0.5, 100 + 16))
    both = registry.make_policy("prefilldecoding", {"size": 8, "inner": "knorm", "target_compression_ratio": 0.5})
    self.assertEqual(both.decoding.target_compression_ratio, 0.5)
    with self.assertRaisesRegex(ValueError, r"Decoding target_compression_ratio=1.0 must be None or a number in "
                                r"\[0, 1\)"):
      DecodingPolicy(H2OPolicy(heavy=4, recent=2), target_size=8, target_compression_ratio=1.0)

  def test_prefill_decoding_hands_off_then_compresses(self):
    cfg, params = tiny_model()
    snap = SnapKVPolicy(10, 3, 3)
    policy = PrefillDecodingPolicy(snap, DecodingPolicy(snap, target_size=8, compression_interval=4))
    self.assertFalse(policy.prefill.lean_decode, "the decoding policy still reads the scores")
    prompt = [np.random.RandomState(1).randint(1, 64, 30).tolist()]
    tokens, lengths = generation.pad_prompts(prompt, bucket=8)
    statics = dict(cfg=cfg, policy=policy, sampling=SamplingConfig(), max_new_tokens=9, stop_ids=())
    capacity = policy.run_capacity(cfg, 30, 9)
    self.assertEqual(capacity, 14)  # max(10 kept, 8) + 4
    state = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                               decode_capacity=capacity, **statics)
    handoff = np.asarray(state.cache.pos)
    plain = snap.compact(generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                                            decode_capacity=40, **{**statics, "policy": dataclasses.replace(
                                                snap, lean_decode=False, capacity=40)}).cache, 14)
    np.testing.assert_array_equal(np.sort(handoff, axis=2), np.sort(np.asarray(plain.pos), axis=2))
    final = generation.decode(params, state, pad_id=0, **statics)
    # 8 decode tokens fed: compressions after steps 4 and 8 leave exactly the target.
    np.testing.assert_array_equal(plans.occupancy(final.cache), 8)

  def test_key_rerotation_reads_kept_keys_at_contiguous_slots(self):
    cfg, params = tiny_model()
    inner = SnapKVPolicy(10, 3, 3)
    policy = KeyRerotationPolicy(inner)
    self.assertEqual(policy.init(cfg, 1, 4).rope_mode, "slot")
    prompt = [np.random.RandomState(2).randint(1, 64, 30).tolist()]
    got = generation.generate(params, cfg, prompt, max_new_tokens=5, policy=policy, bucket=8)
    want = generation.generate(params, cfg, prompt, max_new_tokens=5, bucket=8,
                               policy=dataclasses.replace(inner, rope_mode="slot"))
    self.assertEqual(got.tokens, want.tokens)
    with self.assertRaisesRegex(ValueError, "re-rotation needs pre-RoPE keys"):
      KeyRerotationPolicy(SnapKVPolicy(10, 3, rope_mode="stored"))


def kvpress_layer_budget(q_len, ratio, window, beta, num_layers, layer):
  """kvpress `PyramidKVPress.get_layer_budget`, transcribed (float64)."""
  max_capacity_prompt = window + q_len * (1 - ratio)
  min_num = (max_capacity_prompt - window) / beta
  max_num = (max_capacity_prompt - window) * 2 - min_num
  if max_num >= q_len - window:
    max_num = q_len - window
    min_num = (max_capacity_prompt - window) * 2 - max_num
  if not (q_len >= max_num >= min_num >= window):
    return max(1, round(q_len * (1 - ratio)))
  steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
  return round(max_num - layer * steps)


class DefinitionsTest(parameterized.TestCase):

  @parameterized.parameters((400, 0.5, 8, 20, 30), (1000, 0.75, 32, 20, 24), (300, 0.9, 16, 5, 7),
                            (64, 0.5, 8, 20, 4), (500, 0.2, 64, 20, 30))
  def test_pyramidkv_kvpress_rule(self, q_len, ratio, window, beta, layers):
    capacity = int(round(q_len * (1 - ratio)))
    self.assertAlmostEqual(capacity, q_len * (1 - ratio))
    got = np.asarray(kvpress_pyramid_budgets(layers, capacity, window, beta, q_len)) + window
    want = [kvpress_layer_budget(q_len, ratio, window, beta, layers, l) for l in range(layers)]
    np.testing.assert_array_equal(got, want)
    self.assertLessEqual(int(got.max()), PyramidKVPolicy(capacity, window, budget_rule="kvpress",
                                                         beta=beta).max_kept())

  def test_h2o_mean_received_attention(self):
    policy = H2OPolicy(heavy=3, recent=2, score_norm="mean")
    cache = synthetic(policy, (20, 12))
    scores, _, pos = inner_np(policy, cache)
    raw = np.asarray(cache.scores)
    seen = np.asarray([20, 12])[None, :, None, None]
    np.testing.assert_allclose(np.where(pos >= 0, scores, 0), np.where(pos >= 0, raw / (seen - pos), 0), rtol=1e-6)
    out = policy.compact(cache)
    ranked = np.where(pos >= 0, raw / np.maximum(seen - pos, 1), 0)
    for (l, b, h), keep in kept(out).items():
      n = (20, 12)[b]
      older = sorted(range(n - 2), key=lambda s: (-ranked[l, b, s, h], s))[:3]
      self.assertEqual(keep, sorted(older) + [n - 2, n - 1])
    with self.assertRaisesRegex(ValueError, "H2O score_norm='avg' must be one of"):
      H2OPolicy(2, 2, score_norm="avg")


class RegistryTest(parameterized.TestCase):

  def test_inner_by_name(self):
    policy = registry.make_policy("adakv", {"size": 32, "inner": "tova", "alpha_safeguard": 0.5})
    self.assertEqual(policy, AdaKVPolicy(TOVAPolicy(32), 32, 0.5))
    policy = registry.make_policy("perlayer", {"size": 10, "inner": "h2o", "layer_fractions": (1.5, 0.5)})
    self.assertEqual(policy.budgets, (15, 5))
    self.assertEqual(registry.make_policy("composed", {"size": 8}),
                     ComposedPolicy(StreamingPolicy(4, 12), H2OPolicy(4, 4, rope_mode="slot")))

  @parameterized.parameters(
      ("adakv", {"inner": "lacache"}, r"cache.inner='lacache' for policy 'adakv' must name a scorer policy"),
      ("chunk", {"inner": "snap"}, r"cache.inner='snap' for policy 'chunk' must name a registered policy"),
      ("keyrerotation", {"inner": "keyrerotation"}, r"names the wrapper itself"),
      ("perlayer", {"layer_fractions": (1.0, -1.0)}, r"cache.layer_fractions=\(1.0, -1.0\) must hold positive"),
      ("adakv", {"alpha_safeguard": 1.5}, r"AdaKV alpha_safeguard=1.5 must be a number in \[0, 1\]"),
      ("decoding", {"compression_interval": 0}, r"Decoding compression_interval=0 must be >= 1"),
      ("composed", {"first": "h2o", "second": "tova"}, r"one cache records one statistic"),
  )
  def test_validation_errors_name_the_field(self, name, fields, message):
    with self.assertRaisesRegex(ValueError, message):
      registry.make_policy(name, {"size": 64, **fields})


class PromptCompressorFixTest(parameterized.TestCase):

  @parameterized.parameters("snapkv", "pyramidkv")
  def test_registry_decode_cache_is_the_budget(self, name):
    cfg, params = tiny_model()
    policy = registry.make_policy(name, {"size": 16, "window": 4, "kernel": 3})
    self.assertIsNone(policy.max_new_tokens)  # the registry sets none; run_capacity sizes it anyway
    self.assertEqual(policy.run_capacity(cfg, 40, 6), policy.max_kept() + 6)
    if name == "snapkv":
      self.assertEqual(policy.run_capacity(cfg, 40, 6), 16 + 6)
    prompt = [np.random.RandomState(3).randint(1, 64, 40).tolist()]
    tokens, lengths = generation.pad_prompts(prompt, bucket=8)
    capacity = policy.run_capacity(cfg, 40, 6)
    state = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                               cfg=cfg, policy=policy, sampling=SamplingConfig(), max_new_tokens=6, stop_ids=(),
                               decode_capacity=capacity)
    self.assertEqual(state.cache.capacity, capacity)
    self.assertIsNone(state.cache.scores)
    self.assertEqual(state.cache.rope_mode, "stored")

  def test_window_rows_recording_equals_the_full_matrix(self):
    cfg, params = tiny_model()
    T = 520  # long enough for the blocked attention (no probabilities) at prefill
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 64, (2, T)), jnp.int32)
    t = jnp.arange(T)[None]
    positions = jnp.where(t < jnp.asarray([[T], [T - 37]]), t, -1)
    for mode in ("window:16", "last"):
      cache = init_cache(cfg, 2, T, rope_mode="original", score_mode=mode)
      _, rows = llama.forward(params, tokens, positions, cache, cfg)
      # A probability hook forces the explicit attention over every row: the recording before the change.
      hook = llama.ForwardOptions(probs_hook=lambda p, i: p)
      _, full = llama.forward(params, tokens, positions, cache, cfg, options=hook)
      np.testing.assert_allclose(rows.scores, full.scores, rtol=1e-5, atol=1e-7, err_msg=mode)
      snap = SnapKVPolicy(64, 16, lean_decode=False)
      if mode == "window:16":
        np.testing.assert_array_equal(snap.compact(rows, 80).pos, snap.compact(full, 80).pos)

  @parameterized.parameters("snapkv", "kvmerger", "adakv")
  def test_lean_decode_changes_no_token(self, name):
    cfg, params = tiny_model()
    policy = registry.make_policy(name, {"size": 16, "window": 4, "kernel": 3, "inner": "snapkv"})
    before = (dataclasses.replace(policy, inner=dataclasses.replace(policy.inner, lean_decode=False))
              if name == "adakv" else dataclasses.replace(policy, lean_decode=False))
    prompts = [np.random.RandomState(5).randint(1, 64, n).tolist() for n in (40, 29)]
    got = generation.generate(params, cfg, prompts, max_new_tokens=8, policy=policy, bucket=8)
    want = generation.generate(params, cfg, prompts, max_new_tokens=8, policy=before, bucket=8)
    self.assertEqual(got.tokens, want.tokens)

  def test_kvmerger_run_capacity(self):
    cfg, _ = tiny_model()
    policy = KVMergerPolicy(budget=16, exact_budget=True, skip_layers=())
    self.assertEqual(policy.run_capacity(cfg, 40, 6), int(policy.max_held(cfg, 40).max()) + 6)
    self.assertEqual(KVMergerPolicy(budget=16, exact_budget=True).run_capacity(cfg, 40, 6), 46)  # skipped layers


if __name__ == "__main__":
  absltest.main()
