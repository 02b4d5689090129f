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


if __name__ == "__main__":
  absltest.main()
