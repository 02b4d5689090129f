"""The content-agnostic policies (StreamingLLM, LaCache ladder) applied to a real model cache."""

import json
import os

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache import ladder as ladder_lib
from lacax.cache.kv_cache import init_cache
from lacax.cache.ladder import LadderPolicy
from lacax.cache.streaming import StreamingPolicy
from lacax.cache.full import FullPolicy
from lacax.eval import perplexity
from lacax.model import config as config_lib
from lacax.model import llama

_GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "lacache", "kept_positions.json")


def tiny_model(num_layers=8, seed=0):
  cfg = config_lib.ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=num_layers,
                               num_heads=4, num_kv_heads=2)
  return cfg, llama.init_params(cfg, jax.random.PRNGKey(seed), std=0.1)


def golden_streaming(name):
  with open(_GOLDEN) as f:
    runs = {r["name"]: r for r in json.load(f)["streaming"]}
  run = runs[name]
  kept = {}
  for cp in run["checkpoints"]:
    rows = [np.cumsum(r) for r in cp["rows_delta"]]
    kept[cp["tokens"]] = np.stack([rows[j] for j in cp["layer_row"]])
  return run, kept


def cache_positions(cache, row=0):
  """Original positions each layer holds, slot order: list over layers of int arrays."""
  pos = np.asarray(cache.pos[:, row, :, 0])
  return [p[p >= 0] for p in pos]


class StreamingPolicyTest(parameterized.TestCase):

  def test_keeps_sinks_and_recent_window(self):
    cfg, params = tiny_model()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 101))
    result = perplexity.streaming_nll(params, cfg, tokens, StreamingPolicy(4, 20), chunk=32)
    for layer in cache_positions(result.cache):
      np.testing.assert_array_equal(layer, list(range(4)) + list(range(80, 100)))
    self.assertEqual(result.cache.capacity, 25)

  def test_errors_name_the_field(self):
    with self.assertRaisesRegex(ValueError, "recent_size=0"):
      StreamingPolicy(4, 0)
    with self.assertRaisesRegex(ValueError, "overlap=16 must be in"):
      LadderPolicy(span=16, overlap=16)
    with self.assertRaisesRegex(ValueError, "cache_size=0 must be positive"):
      LadderPolicy(cache_size=0)
    cfg, _ = tiny_model()
    with self.assertRaisesRegex(ValueError, r"span=8 must be < num_layers=8"):
      LadderPolicy(span=8, cache_size=64).init(cfg, 1, 65)
    with self.assertRaisesRegex(ValueError, r"cache_size=12 must be >= 13"):
      LadderPolicy(span=4, cache_size=12).init(cfg, 1, 13)


class LadderPolicyTest(parameterized.TestCase):

  @parameterized.parameters("spec_1_2_N8_S4_O0_C16", "spec_1_2_N8_S4_O2_C24")
  def test_streamed_cache_holds_the_reference_positions(self, name):
    run, kept = golden_streaming(name)
    cfg, params = tiny_model(run["num_layers"])
    policy = LadderPolicy(span=run["span"], overlap=run["overlap"], cache_size=run["cache_size"],
                          start_size=run["start_size"])
    step = jax.jit(lambda c, t, p: policy.compact(llama.forward(params, t, p, c, cfg)[1]))
    cache = policy.init(cfg, 1, policy.decode_capacity(cfg, run["num_tokens"]))
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, run["num_tokens"])
    for t in range(run["num_tokens"]):
      cache = step(cache, jnp.asarray([[tokens[t]]]), jnp.asarray([[t]]))
      if t + 1 in kept:
        got = cache_positions(cache)
        for layer in range(cfg.num_layers):
          np.testing.assert_array_equal(got[layer], kept[t + 1][layer], err_msg=f"tokens={t + 1} layer={layer}")
    self.assertEqual(cache.capacity, ladder_lib.LadderConfig(
        run["num_layers"], run["span"], run["overlap"], run["cache_size"], run["start_size"]).stream_capacity)

  def test_long_stream_matches_the_planner_simulation(self):
    cfg, params = tiny_model(8)
    policy = LadderPolicy(span=4, overlap=2, cache_size=40)
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (1, 1001))
    result = perplexity.streaming_nll(params, cfg, tokens, policy, chunk=250)
    expected = ladder_lib.kept_positions(policy.ladder(cfg.num_layers), 1000)
    for layer, got in enumerate(cache_positions(result.cache)):
      np.testing.assert_array_equal(got, expected[layer])

  def test_batch_rows_of_different_lengths_are_laddered_independently(self):
    cfg, params = tiny_model(8)
    policy = LadderPolicy(span=4, overlap=0, cache_size=20)
    prompts = [list(range(1, 41)), list(range(1, 27))]
    batched = generation.prefill(params, *map(jnp.asarray, generation.pad_prompts(prompts, 8)),
                                 jax.random.PRNGKey(0), cfg=cfg, policy=policy, sampling=generation.SamplingConfig(),
                                 max_new_tokens=4, stop_ids=(), decode_capacity=policy.decode_capacity(cfg, 44))
    for row, prompt in enumerate(prompts):
      expected = ladder_lib.kept_positions_oneshot(policy.ladder(cfg.num_layers), len(prompt))
      for layer, got in enumerate(cache_positions(batched.cache, row)):
        np.testing.assert_array_equal(got, expected[layer], err_msg=f"row={row} layer={layer}")

  def test_one_shot_prefill_then_decode(self):
    cfg, params = tiny_model(8)
    policy = LadderPolicy.for_prefill(cfg, span=4, overlap=0, budget=0.5, prompt_len=240, protocol="niah")
    self.assertEqual((policy.cache_size, policy.start_size), (120, 64))
    prompt = np.random.RandomState(3).randint(0, cfg.vocab_size, 240).tolist()
    result = generation.generate(params, cfg, [prompt], max_new_tokens=8, policy=policy)
    self.assertLen(result.tokens[0], 8)
    state = generation.prefill(params, *map(jnp.asarray, generation.pad_prompts([prompt], 8)),
                               jax.random.PRNGKey(0), cfg=cfg, policy=policy, sampling=generation.SamplingConfig(),
                               max_new_tokens=8, stop_ids=(), decode_capacity=policy.decode_capacity(cfg, 248))
    expected = ladder_lib.kept_positions_oneshot(policy.ladder(cfg.num_layers), 240)
    for layer, got in enumerate(cache_positions(state.cache)):
      np.testing.assert_array_equal(got, expected[layer])


class NeverCompactingPoliciesEqualFullTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("streaming", StreamingPolicy(4, 400)),
      ("ladder", LadderPolicy(span=4, overlap=0, cache_size=400)),
  )
  def test_large_budget_equals_full_cache(self, policy):
    cfg, params = tiny_model(8)
    tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 150))
    full = perplexity.streaming_nll(params, cfg, tokens, FullPolicy(), chunk=64)
    got = perplexity.streaming_nll(params, cfg, tokens, policy, chunk=64)
    np.testing.assert_array_equal(got.nll, full.nll)


class StreamingMemoryTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("streaming", StreamingPolicy(4, 60)),
      ("ladder", LadderPolicy(span=4, overlap=0, cache_size=64)),
  )
  def test_compiled_step_memory_does_not_grow_with_stream_length(self, policy):
    cfg, params = tiny_model(8)
    sizes = []
    for num_tokens in (1_000, 32_000):
      cache = policy.init(cfg, 1, policy.decode_capacity(cfg, num_tokens))
      feed = jnp.zeros((1, 16), jnp.int32)
      compiled = perplexity.stream_chunk.lower(params, cache, feed, feed, feed, cfg=cfg, policy=policy).compile()
      stats = compiled.memory_analysis()
      sizes.append((cache.nbytes(), stats.argument_size_in_bytes, stats.output_size_in_bytes,
                    stats.temp_size_in_bytes))
    self.assertEqual(sizes[0], sizes[1])
    full_small = FullPolicy().init(cfg, 1, FullPolicy().decode_capacity(cfg, 1_000)).nbytes()
    full_big = FullPolicy().init(cfg, 1, FullPolicy().decode_capacity(cfg, 32_000)).nbytes()
    self.assertGreater(full_big, 30 * full_small)  # the full cache does grow


if __name__ == "__main__":
  absltest.main()
