"""Parity on real weights: SmolLM2-135M-Instruct loaded by lacax from the GGUF vs transformers on the same file."""

import functools

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import torch

from lacax import generate as generation
from lacax.cache.kv_cache import init_cache
from lacax.model import config as config_lib
from lacax.eval import texts
from lacax.model import llama
from lacax.weights import loader
from tests import hf_models

_NUM_TOKENS = 320


@functools.lru_cache(maxsize=None)
def smollm2_pair():
  """(lacax model, transformers model, the ids of the default text), loaded once per test process."""
  model = loader.load_model()
  return model, hf_models.smollm2_torch(), model.tokenizer.encode(texts.default_text())


class SmolLM2ParityTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.torch_model, ids = smollm2_pair()
    cls.ids = ids[:_NUM_TOKENS]

  def test_config_is_the_embedded_default(self):
    self.assertEqual(self.model.cfg.replace(name=config_lib.SMOLLM2_135M.name), config_lib.SMOLLM2_135M)

  def test_logits_match_transformers_at_every_position(self):
    self.assertLen(self.ids, _NUM_TOKENS)
    with torch.no_grad():
      ref = self.torch_model(torch.tensor([self.ids])).logits[0].numpy()
    cfg = self.model.cfg
    positions = jnp.arange(_NUM_TOKENS, dtype=jnp.int32)[None]
    logits, _ = jax.jit(llama.forward, static_argnames="cfg")(
        self.model.params, jnp.asarray([self.ids]), positions, init_cache(cfg, 1, _NUM_TOKENS), cfg=cfg)
    got = np.asarray(logits[0])
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max(), rtol=0)

  def test_greedy_chat_generation_matches_transformers(self):
    tok = self.model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompt = tok.encode(text)
    result = generation.generate(self.model.params, self.model.cfg, [prompt], max_new_tokens=24)
    with torch.no_grad():
      ref = self.torch_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
    self.assertEqual(result.tokens[0], ref[0, len(prompt):].tolist())
    self.assertIn("Paris", tok.decode(result.tokens[0]))


if __name__ == "__main__":
  absltest.main()
