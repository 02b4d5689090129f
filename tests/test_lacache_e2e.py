"""End to end on the real model: lacax's ladder cache vs transformers running the reference's cache pattern.

The torch side is SmolLM2-135M-Instruct loaded by `transformers` from the same GGUF file, driven module by module
(its embedding, norms, projections, rotary embedding, MLP and head) the way the LaCache reference patches
Llama attention: keys cached before RoPE and rotated at their cache slot on every step, the query at its own
slot, and after every token each layer keeps exactly the slots the reference's index arithmetic keeps
(`ladder.reference_plan`, the literal list oracle checked against GATECH-EIC/LaCache).
"""


from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.llama import modeling_llama

from lacax.cache import ladder as ladder_lib
from lacax.cache.ladder import LadderPolicy
from lacax.model import llama
from tests.test_smollm2 import smollm2_pair

_NUM_TOKENS = 160


class TorchLaCache:
  """A pos-shift LaCache decoder over a transformers Llama model (batch 1, one token per step)."""

  def __init__(self, model, ladder: ladder_lib.LadderConfig):
    self.model, self.ladder = model, ladder
    self.keys = [None] * ladder.num_layers  # pre-RoPE [1, KV, len, hd]
    self.values = [None] * ladder.num_layers
    self.state = dict(cursor=ladder.start_size, compacted=False, cache_size=ladder.cache_size)

  @torch.no_grad()
  def step(self, token: int) -> np.ndarray:
    inner, cfg = self.model.model, self.model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    x = inner.embed_tokens(torch.tensor([[token]]))
    for i, layer in enumerate(inner.layers):
      attn = layer.self_attn
      h = layer.input_layernorm(x)
      q = attn.q_proj(h).view(1, 1, heads, head_dim).transpose(1, 2)
      k = attn.k_proj(h).view(1, 1, kv_heads, head_dim).transpose(1, 2)
      v = attn.v_proj(h).view(1, 1, kv_heads, head_dim).transpose(1, 2)
      self.keys[i] = k if self.keys[i] is None else torch.cat([self.keys[i], k], dim=2)
      self.values[i] = v if self.values[i] is None else torch.cat([self.values[i], v], dim=2)
      length = self.keys[i].shape[2]
      cos, sin = inner.rotary_emb(v, torch.arange(length)[None])
      keys, _ = modeling_llama.apply_rotary_pos_emb(self.keys[i], self.keys[i], cos, sin)
      query, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
      keys = modeling_llama.repeat_kv(keys, heads // kv_heads)
      values = modeling_llama.repeat_kv(self.values[i], heads // kv_heads)
      probs = torch.softmax(query @ keys.transpose(2, 3) / head_dim**0.5, dim=-1)
      out = (probs @ values).transpose(1, 2).reshape(1, 1, heads * head_dim)
      x = x + attn.o_proj(out)
      x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = self.model.lm_head(inner.norm(x))[0, 0].numpy()
    plan, self.state = ladder_lib.reference_plan(self.ladder, self.state, self.keys[0].shape[2])
    for i, keep in enumerate(plan):
      self.keys[i] = self.keys[i][:, :, keep]
      self.values[i] = self.values[i][:, :, keep]
    return logits


class LaCacheEndToEndTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.torch_model, ids = smollm2_pair()
    cls.ids = ids[:_NUM_TOKENS]

  @parameterized.named_parameters(
      ("R1_span16_overlap0", 16, 0, 48),  # B=2, A=1, R=1: one token per group, 7 startovers in 160 tokens
      ("R7_span9_overlap7", 9, 7, 48),  # the SmolLM2 setting of the paper: B=12, A=5, R=7; 5 startovers
  )
  def test_streamed_logits_match_transformers_with_the_reference_pattern(self, span, overlap, cache_size):
    cfg, params = self.model.cfg, self.model.params
    policy = LadderPolicy(span=span, overlap=overlap, cache_size=cache_size)
    reference = TorchLaCache(self.torch_model, policy.ladder(cfg.num_layers))
    @jax.jit
    def step(params, cache, token, position):
      logits, cache = llama.forward(params, token, position, cache, cfg)
      return logits[0, 0], policy.compact(cache)

    cache = policy.init(cfg, 1, policy.decode_capacity(cfg, _NUM_TOKENS))
    worst = 0.0
    for t, token in enumerate(self.ids):
      got, cache = step(params, cache, jnp.asarray([[token]]), jnp.asarray([[t]]))
      ref = reference.step(token)
      got = np.asarray(got)
      self.assertEqual(int(got.argmax()), int(ref.argmax()), msg=f"token {t}")
      worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    self.assertLess(worst, 2e-3)
    kept = np.asarray(cache.pos[:, 0, :, 0])
    for i in range(cfg.num_layers):
      self.assertEqual(int((kept[i] >= 0).sum()), reference.keys[i].shape[2])


if __name__ == "__main__":
  absltest.main()
