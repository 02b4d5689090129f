"""The contract every registered cache policy keeps, checked for each entry of `lacax.cache.registry`.

A new policy is covered by adding it to the registry: the instances come from `tests/cache_policies.py`
(the registry at one tiny budget), and every test here is parameterized over `registry.policy_names()`.

  budget     right after every compaction a (row, kv head) of each layer holds at most `max_held(cfg, seen)`
             tokens: in token-by-token streaming (policies that compact in decode), after the prefill
             hand-off of prompts longer than the budget, and through the decode loop that follows;
  sinks      the first `sink_tokens` tokens stay in every layer, at the front, in order;
  no-op      a policy whose budget exceeds the run never compacts: streaming NLL and greedy generation equal
             the full cache's;
  sharded    sharded == unsharded on 8 fake CPU devices: `tests/test_sharding.py` runs every registered
             policy (its lists come from the registry); the test here checks that it does;
  structure  the method modules import only the shared helpers, never each other; the registry holds no
             second copy of a policy's defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache import plans, registry
from lacax.cache.full import FullPolicy
from lacax.eval import perplexity
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.sampling import SamplingConfig
from tests import cache_policies

NAMES = registry.policy_names()
_NAMED = [(f"_{name}", name) for name in NAMES]  # test ids name the policy
PROMPT_LENGTHS = (40, 29)
MAX_NEW = 6
STREAM_TOKENS = 48
_CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lacax", "cache")


@functools.lru_cache(maxsize=None)
def tiny_model():
  cfg = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=8)
  return cfg, llama.init_params(cfg, jax.random.PRNGKey(0), std=0.1)


def prompts():
  rng = np.random.RandomState(1)
  return [rng.randint(1, 64, n).tolist() for n in PROMPT_LENGTHS]


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def _stream_occupancy(params, cache, tokens, *, cfg, policy):
  """Streams tokens [B, T] one per step; per step: occupancy [L, B, KV] and the first slots' positions."""

  def step(cache, inputs):
    token, position = inputs
    _, cache = llama.forward(params, token[:, None], position[:, None], cache, cfg)
    cache = policy.compact(cache)
    return cache, (plans.occupancy(cache), cache.pos[:, :, :4])

  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  _, (held, front) = jax.lax.scan(step, cache, (tokens.T, positions.T))
  return held, front  # [T, L, B, KV], [T, L, B, 4, KV]


def _handoff_and_decode(policy, cfg, params, prompt_list):
  tokens, lengths = generation.pad_prompts(prompt_list, bucket=8)
  statics = dict(cfg=cfg, policy=policy, sampling=SamplingConfig(), max_new_tokens=MAX_NEW, stop_ids=())
  capacity = policy.run_capacity(cfg, int(lengths.max()), MAX_NEW)  # as lacax.generate sizes it
  state = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                             decode_capacity=capacity, **statics)
  handoff = (np.asarray(plans.occupancy(state.cache)), np.asarray(state.cache.pos))
  final = generation.decode(params, state, pad_id=0, **statics)
  return handoff, (np.asarray(plans.occupancy(final.cache)), np.asarray(final.cache.pos)), np.asarray(final.out)


def _stream_tokens():
  return np.random.RandomState(2).randint(0, 64, (2, STREAM_TOKENS)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def full_cache_reference():
  """(streaming NLL [2, T - 1], greedy tokens [2, MAX_NEW]) of the full cache."""
  cfg, params = tiny_model()
  nll = perplexity.streaming_nll(params, cfg, _stream_tokens(), FullPolicy(), chunk=STREAM_TOKENS).nll
  return nll, _handoff_and_decode(FullPolicy(), cfg, params, prompts())[2]


def assert_sinks(test, pos, sinks, what):
  """pos [L, B, S, KV]: slots [0, sinks) hold tokens [0, sinks) in every layer, row and head."""
  if sinks:
    want = np.broadcast_to(np.arange(sinks)[None, None, :, None], pos[:, :, :sinks].shape)
    np.testing.assert_array_equal(pos[:, :, :sinks], want, err_msg=f"{what}: sinks not kept")


class ContractTest(parameterized.TestCase):

  @parameterized.named_parameters(*_NAMED)
  def test_streaming_budget_and_sinks(self, name):
    policy = cache_policies.tiny_policy(name)
    if not policy.compacts_in_decode:
      self.assertNotIn(name, cache_policies.streaming_names())
      return  # a prompt compressor never evicts in streaming; its budget is checked at the hand-off
    cfg, params = tiny_model()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, STREAM_TOKENS)).astype(np.int32)
    cache = policy.init(cfg, 2, policy.decode_capacity(cfg, STREAM_TOKENS))
    held, front = jax.device_get(_stream_occupancy(params, cache, jnp.asarray(tokens), cfg=cfg, policy=policy))
    for t in range(STREAM_TOKENS):
      bound = policy.max_held(cfg, t + 1)[:, None, None]
      self.assertTrue(np.all(held[t] <= bound), f"{name} after {t + 1} tokens holds {held[t].max(axis=(1, 2))} "
                                                 f"> max_held {bound.ravel()}")
    if name != "full":  # the stream is longer than the budget: something was evicted
      self.assertLess(int(held[-1].min()), STREAM_TOKENS, f"{name} compacted nothing")
    sinks = policy.sink_tokens
    self.assertLessEqual(sinks, 4)
    assert_sinks(self, front[-1][:, :, :sinks], sinks, f"{name} streaming")

  @parameterized.named_parameters(*_NAMED)
  def test_handoff_and_decode_budget_and_sinks(self, name):
    cfg, params = tiny_model()
    policy = cache_policies.tiny_policy(name, max_new_tokens=MAX_NEW)
    (held, pos), (final_held, final_pos), _ = _handoff_and_decode(policy, cfg, params, prompts())
    decoded = MAX_NEW - 1  # the loop feeds the generated tokens but the last
    for row, length in enumerate(PROMPT_LENGTHS):
      bound = policy.max_held(cfg, length)[:, None]
      self.assertTrue(np.all(held[:, row] <= bound), f"{name} row {row}: hand-off holds "
                                                      f"{held[:, row].max(-1)} > max_held {bound.ravel()}")
      if policy.compacts_in_decode:
        final_bound = policy.max_held(cfg, length + decoded)[:, None]
      else:
        final_bound = bound + decoded
      self.assertTrue(np.all(final_held[:, row] <= final_bound), f"{name} row {row}: decode holds "
                                                                  f"{final_held[:, row].max(-1)} > {final_bound.ravel()}")
      if name != "full" and policy.compacts_in_prefill:  # prompts over the budget: something evicted or merged
        self.assertLess(int(held[:, row].min()), length, f"{name} row {row} compacted nothing")
    assert_sinks(self, pos, policy.sink_tokens, f"{name} hand-off")
    assert_sinks(self, final_pos, policy.sink_tokens, f"{name} decode")

  @parameterized.named_parameters(*_NAMED)
  def test_never_compacting_equals_full(self, name):
    cfg, params = tiny_model()
    roomy = registry.make_policy(name, {**cache_policies.TINY_CACHE, "size": 64})
    want_nll, out_full = full_cache_reference()
    got = perplexity.streaming_nll(params, cfg, _stream_tokens(), roomy, chunk=STREAM_TOKENS)
    np.testing.assert_allclose(got.nll, want_nll, atol=2e-5, rtol=1e-5, err_msg=f"{name} streaming NLL")
    kept = np.sort(np.where(got.cache.pos >= 0, got.cache.pos, 10**6), axis=2)[:, :, :STREAM_TOKENS - 1]
    np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(STREAM_TOKENS - 1)[None, None, :, None],
                                                        kept.shape), err_msg=f"{name} evicted a token")
    _, _, out = _handoff_and_decode(roomy, cfg, params, prompts())
    np.testing.assert_array_equal(out, out_full, err_msg=f"{name} greedy tokens differ from the full cache")


class RegistryTest(parameterized.TestCase):

  def test_every_policy_runs_sharded(self):
    from tests import test_sharding  # pylint: disable=g-import-not-at-top

    checks = test_sharding.check_names()
    for name in NAMES:
      self.assertTrue(any(c.startswith((f"stream_{name}_", f"generate_{name}_")) for c in checks),
                      f"{name} has no 8-device check in tests/test_sharding.py")

  @parameterized.named_parameters(*_NAMED)
  def test_defaults_live_on_the_dataclass(self, name):
    spec = registry.POLICIES[name]
    policy = registry.make_policy(name, {"size": 64})
    defaults = registry.cache_defaults()
    sized = set(spec.sized(64, spec.reader({})) if spec.sized else {})
    sized |= set(spec.composite({"size": 64}, 64) if spec.composite else {})  # a wrapper's inner policies
    for f in dataclasses.fields(policy):
      if f.name in sized:
        continue
      want = spec.overrides.get(f.name, f.default)
      self.assertEqual(getattr(policy, f.name), want, f"{name}.{f.name}")
    for config_field, policy_field in spec.fields.items():
      self.assertEqual(defaults[config_field], getattr(policy, policy_field), f"cache.{config_field}")
    # Every config field maps to a field of the policy.
    for config_field, policy_field in spec.fields.items():
      self.assertIn(policy_field, {f.name for f in dataclasses.fields(policy)})

  def test_configs_take_the_registry_defaults(self):
    from configs import lacache, longbench  # pylint: disable=g-import-not-at-top

    defaults = registry.cache_defaults()
    for config in (lacache.get_config(), longbench.get_config()):
      for key, value in defaults.items():
        self.assertEqual(config.cache[key], value, f"{config.experiment}: cache.{key}")

  def test_config_fields_reach_the_policy(self):
    policy = registry.make_policy("lacache", {"size": 64, "span": 3, "overlap": 1})
    self.assertEqual((policy.span, policy.overlap, policy.cache_size), (3, 1, 64))
    policy = registry.make_policy("kvmerger", {"size": 64, "merge_threshold": 0.5, "exact_budget": False})
    self.assertEqual((policy.eps, policy.exact_budget, policy.budget), (0.5, False, 64))
    self.assertEqual(registry.make_policy("streaming", {"size": 20, "start_size": 6}).recent_size, 14)

  @parameterized.named_parameters(*_NAMED)
  def test_one_shot_protocol_from_the_config_defaults(self, name):
    # What a job builds for every policy (configs carry cache_defaults(): inner="", the wrapper's own default):
    # a budgeted policy (its own budget or its parts', as composed / perlayer) holds fewer than the prompt.
    cfg, _ = tiny_model()
    cache = {**registry.cache_defaults(), "budget": 0.25, "window": 4, "kernel": 3, "start_size": 2,
             "chunk_length": 16, "block_size": 8, "merge_budget": 4, "attention_chunk_size": 16,
             "sink_size_start": 2, "sink_size_end": 2, "span": 2}
    policy = registry.make_prefill_policy(name, cache, cfg, prompt_len=512)
    capacity = policy.run_capacity(cfg, 512, MAX_NEW)
    # Policies whose decode cache holds the whole run by definition: decode-time compression (decoding, cam,
    # prefilldecoding: its interval of 512 steps), layers or heads that keep every token (duoattention's
    # retrieval heads, simlayerkv's non-lazy layers, kvmerger's unmerged layers, kvzip's one budget over all
    # heads, think's pruned channels).
    whole_run = ("decoding", "cam", "prefilldecoding", "duoattention", "simlayerkv", "kvmerger", "kvzip", "think")
    if registry.POLICIES[name].budgeted and name not in whole_run:
      self.assertLess(capacity, 512, name)
    else:
      self.assertEqual(capacity, 512 + MAX_NEW, name)
    if name == "cam":  # CaM's inner must read no attention: Knorm, not the other wrappers' SnapKV
      self.assertEqual(type(policy.inner).__name__, "KnormPolicy")
    elif registry.POLICIES[name].composite is not None and hasattr(policy, "inner"):
      self.assertEqual(type(policy.inner).__name__, "SnapKVPolicy", name)

  def test_calibrated_scorers_say_what_they_lack_before_any_work(self):
    cfg, _ = tiny_model()
    self.assertIn("cache.qfilter_path is empty", registry.make_policy("qfilter", {"size": 8}).run_problems(cfg)[0])
    self.assertIn("cache.expected_attention_stats is empty",
                  registry.make_policy("expectedattention", {"size": 8}).run_problems(cfg)[0])
    self.assertEqual(registry.make_policy("expectedattention", {"size": 8, "expected_attention_statistics": "online"})
                     .run_problems(cfg), [])
    wrapped = registry.make_policy("adakv", {"size": 8, "inner": "qfilter"})  # wrappers ask their parts
    self.assertLen(wrapped.run_problems(cfg), 1)
    other = cache_policies.qfilter_file(3, 2, 8)
    self.assertIn("another model's", registry.make_policy("qfilter", {"size": 8, "qfilter_path": other})
                  .run_problems(cfg)[0])
    mine = cache_policies.qfilter_file(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    self.assertEqual(registry.make_policy("qfilter", {"size": 8, "qfilter_path": mine}).run_problems(cfg), [])
    self.assertEqual(registry.make_policy("streaming", {"size": 8}).run_problems(cfg), [])

  def test_names_have_no_underscore(self):
    # tests/test_sharding.py names its checks "<kind>_<policy>_<mesh>" and splits them on "_".
    for name in NAMES:
      self.assertNotIn("_", name, f"registry name {name!r}")

  def test_unknown_name_and_bad_budget_are_named(self):
    with self.assertRaisesRegex(ValueError, r"cache policy 'h20' is unknown; expected one of"):
      registry.make_policy("h20", {"size": 16})
    with self.assertRaisesRegex(ValueError, r"cache.size=0 must be a positive number of tokens for policy 'tova'"):
      registry.make_policy("tova", {"size": 0})

  def test_method_modules_import_only_shared_helpers(self):
    methods = {spec.cls.__module__ for spec in registry.POLICIES.values()}
    self.assertLen(methods, len(NAMES), "one module per method")
    for module in methods:
      path = os.path.join(_CACHE_DIR, module.rsplit(".", 1)[1] + ".py")
      with open(path) as f:
        tree = ast.parse(f.read())
      imported = set()
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
          imported.add(node.module)
          imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
          imported.update(a.name for a in node.names)
      siblings = sorted(imported & (methods - {module}))
      self.assertEqual(siblings, [], f"{module} imports its sibling method modules {siblings}")


if __name__ == "__main__":
  absltest.main()
