"""Parity with kvpress (NVIDIA/kvpress) for every method both have: same kept positions, same greedy tokens.

kvpress pins an older transformers than lacax's test extra, so it runs in its own virtual environment, built
once by `experiments.kvpress_reference.ensure_env` (about 3 minutes on a loaded 2-core machine, then cached
under $LACAX_CACHE_DIR/kvpress-ref) and skipped with the reason only when it cannot be built. Both sides prefill
the same prompt on the same tiny random Llama (saved with transformers, loaded by lacax's HF loader), compress
once to the same budget, and decode greedily without further eviction (kvpress's protocol).

Each `MethodPair` of `experiments.kvpress_reference.METHODS` is one test: "exact" pairs must agree on every
(layer, KV head) kept set and on every greedy token; "differs" pairs document a difference of definition (their
`note`) and must differ until lacax has the kvpress-definition option (`kvpress_definition`), after which they
are checked as exact; pairs whose lacax policy is not registered yet are skipped, naming it.
"""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from experiments import kvpress_reference as ref
from lacax.cache import registry
from lacax.weights import hf
from tests import hf_models

_RATIO = 0.5
_NEW_TOKENS = 6
_PROMPT_LEN = 64
# Pairs whose layers or heads keep their own numbers of tokens: PyramidKV's per-layer budgets, ThinK (prunes
# key channels, keeps every token), SimLayerKV (only lazy layers are compressed), AdaKV and CriticalAdaKV
# (head-wise budgets), DuoAttention (only streaming heads), KVzip (one budget over all layers and heads).
_OWN_BUDGETS = ("pyramidkv", "think", "simlayerkv", "adakv", "criticaladakv", "duoattention", "kvzip")


class KvpressParityTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.skip_reason = None
    try:
      python, cls.env = ref.ensure_env()
    except ref.EnvUnavailable as e:
      cls.skip_reason = f"the kvpress reference environment cannot be built here: {e}"
      return
    cls.model_dir, _ = hf_models.saved_model("llama_tied")
    cls.cfg, params = hf.load_hf_checkpoint(cls.model_dir)
    cls.params = jax.tree.map(jnp.asarray, params)
    cls.prompt = np.random.RandomState(3).randint(0, cls.cfg.vocab_size, _PROMPT_LEN).tolist()
    pairs = ref.available_pairs()
    definitions = [dataclasses.replace(p, key=p.key + "@kvpress") for p in pairs if p.kvpress_definition]
    cls.reference = ref.run_kvpress(python, cls.model_dir, cls.prompt, pairs + definitions, _RATIO, _NEW_TOKENS)

  def setUp(self):
    super().setUp()
    if self.skip_reason:
      self.skipTest(self.skip_reason)

  def lacax(self, pair, definition=None):
    policy = ref.lacax_policy(pair, self.cfg, _PROMPT_LEN, _RATIO, definition=definition)
    return ref.lacax_side(self.params, self.cfg, self.prompt, policy, _NEW_TOKENS)

  def assert_same(self, ours, theirs, what):
    budget = int(_PROMPT_LEN * (1 - _RATIO))
    for layer, heads in theirs["kept"].items():
      for head, kept in enumerate(heads):
        self.assertEqual(ours["kept"][layer][head], kept, f"{what}: layer {layer}, KV head {head}")
        if what.split("@")[0] not in _OWN_BUDGETS:
          self.assertLen(kept, budget)
    self.assertEqual(ours.get("pruned"), theirs.get("pruned"), f"{what}: pruned key channels")
    self.assertEqual(ours["tokens"], theirs["tokens"], f"{what}: greedy tokens")

  @parameterized.named_parameters((p.key, p) for p in ref.METHODS)
  def test_parity(self, pair):
    if pair.status == "not_comparable":
      self.skipTest(f"{pair.key}: {pair.note}")
    self.assertIn(pair.policy, registry.POLICIES, f"{pair.key}: experiments/kvpress_reference.py names a lacax "
                  f"policy {pair.policy!r} that the registry lacks")
    ours, theirs = self.lacax(pair), self.reference[pair.key]
    if pair.status == "exact":
      self.assert_same(ours, theirs, pair.key)
      return
    # "differs": the documented difference of definition is there ...
    self.assertNotEqual(ours["kept"], theirs["kept"], f"{pair.key} was documented to differ: {pair.note}")
    if pair.kvpress_definition:  # ... and lacax's kvpress-definition option removes it
      self.assert_same(self.lacax(pair, pair.kvpress_definition), self.reference[pair.key + "@kvpress"],
                       pair.key + "@kvpress")


# SmolLM2-135M (the slower test): the methods whose agreement with kvpress the issue names. StreamingLLM and
# SnapKV keep the same positions in every layer and KV head; TOVA the same up to the prompt's last token (its
# documented difference); PyramidKV with kvpress's budget rule the same; H2O differs by definition. The other
# pairs run on SmolLM2 in `python -m experiments.kvpress_reference` (512 tokens, about 5 minutes).
_SMOLLM2_PAIRS = ("streaming", "snapkv", "tova", "h2o", "pyramidkv")
_SMOLLM2_PROMPT = 128


class SmolLM2KvpressParityTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.skip_reason = None
    try:
      python, _ = ref.ensure_env()
    except ref.EnvUnavailable as e:
      cls.skip_reason = f"the kvpress reference environment cannot be built here: {e}"
      return
    from lacax.eval.texts import default_text  # pylint: disable=g-import-not-at-top
    from lacax.weights import loader  # pylint: disable=g-import-not-at-top

    model = loader.load_model()
    cls.cfg, cls.params = model.cfg, model.params
    cls.prompt = model.tokenizer.encode(default_text())[:_SMOLLM2_PROMPT]
    # kvpress reads transformers' own conversion of the same GGUF file, saved once as a checkpoint.
    cls.model_dir = hf_models.smollm2_checkpoint_dir()
    pairs = [p for p in ref.pairs_for(_SMOLLM2_PROMPT, cls.cfg.num_layers, cls.cfg.num_kv_heads)
             if p.key in _SMOLLM2_PAIRS]
    cls.pairs = {p.key: p for p in pairs}
    definitions = [dataclasses.replace(p, key=p.key + "@kvpress") for p in pairs if p.kvpress_definition]
    cls.reference = ref.run_kvpress(python, cls.model_dir, cls.prompt, pairs + definitions, _RATIO, _NEW_TOKENS)

  def setUp(self):
    super().setUp()
    if self.skip_reason:
      self.skipTest(self.skip_reason)

  def lacax(self, key, definition=None):
    policy = ref.lacax_policy(self.pairs[key], self.cfg, _SMOLLM2_PROMPT, _RATIO, definition=definition)
    return ref.lacax_side(self.params, self.cfg, self.prompt, policy, _NEW_TOKENS)

  def assert_same(self, ours, theirs, what):
    budget = int(_SMOLLM2_PROMPT * (1 - _RATIO))
    for layer, heads in theirs["kept"].items():
      for head, kept in enumerate(heads):
        self.assertEqual(ours["kept"][layer][head], kept, f"{what}: layer {layer}, KV head {head}")
        if what != "pyramidkv@kvpress":
          self.assertLen(kept, budget)
    self.assertEqual(ours["tokens"], theirs["tokens"], f"{what}: greedy tokens")

  @parameterized.parameters("streaming", "snapkv")
  def test_exact(self, key):
    self.assert_same(self.lacax(key), self.reference[key], key)

  def test_tova_differs_at_most_by_the_last_token(self):
    ours, theirs = self.lacax("tova"), self.reference["tova"]
    last = _SMOLLM2_PROMPT - 1
    for layer, heads in theirs["kept"].items():
      for head, kept in enumerate(heads):
        mine, other = set(ours["kept"][layer][head]), set(kept)
        self.assertIn(last, other, "kvpress's TOVA always keeps the prompt's last token")
        self.assertLessEqual(other - mine, {last}, f"layer {layer}, KV head {head}")
        self.assertLessEqual(len(mine - other), 1, f"layer {layer}, KV head {head}")

  def test_pyramidkv_with_kvpress_budget_rule(self):
    key = "pyramidkv"
    self.assertNotEqual(self.lacax(key)["kept"], self.reference[key]["kept"])  # KVCache-Factory's budgets
    self.assert_same(self.lacax(key, self.pairs[key].kvpress_definition), self.reference[key + "@kvpress"],
                     key + "@kvpress")

  def test_h2o_differs_by_definition(self):
    ours, theirs = self.lacax("h2o"), self.reference["h2o"]
    self.assertNotEqual(ours["kept"], theirs["kept"], self.pairs["h2o"].note)
    for layer, heads in ours["kept"].items():  # lacax's H2O: heavy hitters + the recent half of the budget
      for kept in heads:
        self.assertContainsSubset(range(_SMOLLM2_PROMPT - _SMOLLM2_PROMPT // 4, _SMOLLM2_PROMPT), kept, layer)


if __name__ == "__main__":
  absltest.main()
