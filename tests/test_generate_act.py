"""ACT calibration in generation: `generate(..., act=)` runs the hook in the prefill and in every decode step."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.act import calibration as cal
from lacax.cache.kv_cache import init_cache
from lacax.model import llama
from lacax.weights import hf
from tests import hf_models

_forward = jax.jit(llama.forward, static_argnames=("cfg", "probs_hook"))


def _tiny():
  path, _ = hf_models.saved_model("llama_tied")
  cfg, params = hf.load_hf_checkpoint(path)
  return cfg, jax.tree.map(jnp.asarray, params)


def _hand_rolled(params, cfg, prompt, max_new_tokens, hook):
  """Greedy decoding of one unpadded prompt, one forward per token, with the ACT hook in every forward."""
  cache = init_cache(cfg, 1, len(prompt) + max_new_tokens)
  positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
  logits, cache = _forward(params, jnp.asarray([prompt], jnp.int32), positions, cache, cfg=cfg, probs_hook=hook)
  out, all_logits = [], [np.asarray(logits[0, -1])]
  token = int(jnp.argmax(logits[0, -1]))
  for step in range(max_new_tokens - 1):
    out.append(token)
    logits, cache = _forward(params, jnp.asarray([[token]], jnp.int32),
                             jnp.asarray([[len(prompt) + step]], jnp.int32), cache, cfg=cfg, probs_hook=hook)
    all_logits.append(np.asarray(logits[0, -1]))
    token = int(jnp.argmax(logits[0, -1]))
  out.append(token)
  return out, np.stack(all_logits)


class GenerateWithACTTest(absltest.TestCase):

  def test_generate_with_act_equals_a_hand_rolled_decode_with_the_hook(self):
    cfg, params = _tiny()
    act = cal.ACTConfig(heads={(l, h) for l in (1, 2) for h in range(cfg.num_heads)}, beta=0.0, threshold=0.05)
    hook = cal.make_probs_hook(act, cfg)
    prompts = [[5, 17, 3, 99, 42, 7, 1, 1, 1, 60], [11, 2, 2, 2]]
    result = generation.generate(params, cfg, prompts, max_new_tokens=8, bucket=8, act=act)
    changed = 0.0
    for prompt, got in zip(prompts, result.tokens):
      want, want_logits = _hand_rolled(params, cfg, prompt, 8, hook)
      self.assertEqual(got, want)
      _, plain_logits = _hand_rolled(params, cfg, prompt, 8, None)
      changed = max(changed, float(np.abs(want_logits - plain_logits).max()))
    self.assertGreater(changed, 1e-3)  # the calibration changed the model's outputs

  def test_identity_calibrations_equal_plain_generation(self):
    cfg, params = _tiny()
    prompts = [[5, 17, 3, 99, 42, 7], [64, 8, 9]]
    plain = generation.generate(params, cfg, prompts, max_new_tokens=10, bucket=8)
    no_heads = generation.generate(params, cfg, prompts, max_new_tokens=10, bucket=8, act=cal.ACTConfig())
    every_head_beta_one = generation.generate(
        params, cfg, prompts, max_new_tokens=10, bucket=8,
        act=cal.ACTConfig(heads={(l, h) for l in range(cfg.num_layers) for h in range(cfg.num_heads)}, beta=1.0))
    self.assertEqual(no_heads.tokens, plain.tokens)
    self.assertEqual(every_head_beta_one.tokens, plain.tokens)

  def test_act_and_a_hook_in_options_are_rejected_together(self):
    cfg, params = _tiny()
    with self.assertRaisesRegex(ValueError, "act and options.probs_hook"):
      generation.generate(params, cfg, [[1, 2]], max_new_tokens=2, act=cal.ACTConfig(heads={(0, 0)}),
                          options=llama.ForwardOptions(probs_hook=lambda p, i: p))


if __name__ == "__main__":
  absltest.main()
