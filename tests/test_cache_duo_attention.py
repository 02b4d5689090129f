"""DuoAttention (lacax/cache/duo_attention.py) restated in NumPy on a tiny GQA model.

kvpress `presses/duo_attention_press.py`: the round(L * KV * ratio) lowest-scored (layer, kv head) pairs stream
and keep keys [0, sink) and [k_len - recent, k_len) of the prompt, the others keep all; the on-the-fly head
scores are the mean of the cumulated last-query attention over repeated, rotated mean queries and keys.
"""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache import duo_attention, registry
from lacax.cache.duo_attention import DuoAttentionPolicy
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.model import rope as rope_lib
from tests import cache_policies

CFG = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=8)
PARAMS = llama.init_params(CFG, jax.random.PRNGKey(0), std=0.1)
LENGTHS = (40, 29)


def prefilled(policy, lengths=LENGTHS):
  prompts = [np.random.RandomState(5).randint(1, 64, n).tolist() for n in lengths]
  tokens, lens = generation.pad_prompts(prompts, bucket=8)
  n = tokens.shape[1]
  cache = policy.init(CFG, len(lengths), n)
  positions = np.where(np.arange(n)[None] < lens[:, None], np.arange(n)[None], -1).astype(np.int32)
  _, cache = jax.jit(llama.forward, static_argnames="cfg")(PARAMS, jnp.asarray(tokens), jnp.asarray(positions),
                                                           cache, cfg=CFG)
  return cache


def kvpress_streaming_mask(scores, ratio):
  """kvpress post_init_from_model, literally (distinct scores: np.argsort's order is then unique)."""
  scores = np.asarray(scores)
  n_pruned = round(scores.size * ratio)
  mask = np.zeros(scores.shape, bool)
  if n_pruned > 0:
    mask[np.unravel_index(np.argsort(scores, axis=None)[:n_pruned], scores.shape)] = True
  return mask


def kvpress_on_the_fly(q_mean, k_mean, inv_freq, q_len):
  """kvpress duo_attention_on_the_fly's per-text score, literally: full Q and K of q_len repeated means."""
  L, H, d = q_mean.shape
  KV = k_mean.shape[1]
  out = np.zeros((L, KV))
  pos = np.arange(q_len)
  ang = np.outer(pos, inv_freq)
  cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
  rotate_half = lambda x: np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)  # noqa: E731
  for layer in range(L):
    q = np.repeat(q_mean[layer][:, None, :], q_len, 1)  # [H, q_len, d]
    k = np.repeat(k_mean[layer][:, None, :], q_len, 1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k = np.repeat(k, H // KV, axis=0)
    w = q[:, -1:, :] @ np.swapaxes(k, 1, 2) / d ** 0.5  # [H, 1, q_len]
    w = np.exp(w - w.max(-1, keepdims=True))
    w = (w / w.sum(-1, keepdims=True))[:, 0]
    s = np.cumsum(w, axis=1).mean(1)
    out[layer] = s.reshape(-1, H // KV).mean(1)
  return out


class DuoAttentionTest(absltest.TestCase):

  def test_streaming_heads_keep_sinks_and_recent(self):
    scores = cache_policies.duo_head_scores(4, 2)
    policy = DuoAttentionPolicy(head_scores=scores, head_compression_ratio=0.5, sink_size=3, recent_size=9)
    want_mask = kvpress_streaming_mask(scores, 0.5)
    self.assertEqual(int(want_mask.sum()), 4)
    np.testing.assert_array_equal(policy.mask(CFG), want_mask)
    cache = policy.compact(prefilled(policy), capacity=48)
    kept = cache_policies.kept_positions(cache)
    for (layer, row, head), got in kept.items():
      n = LENGTHS[row]
      want = sorted(set(range(3)) | set(range(n - 9, n))) if want_mask[layer, head] else list(range(n))
      self.assertEqual(got, want, f"layer {layer}, row {row}, kv head {head}")
    # Decode never evicts: a step appends the token to every head.
    self.assertFalse(policy.compacts_in_decode)
    np.testing.assert_array_equal(policy.max_held(CFG, 40), [40] * 4)

  def test_explicit_mask_and_all_streaming_layers(self):
    mask = ((True, True), (False, True), (False, False), (True, True))
    policy = DuoAttentionPolicy(streaming_heads=mask, sink_size=2, recent_size=6)
    np.testing.assert_array_equal(policy.max_held(CFG, 40), [8, 40, 40, 8])
    kept = cache_policies.kept_positions(policy.compact(prefilled(policy, (20,)), capacity=24))
    self.assertEqual(kept[(0, 0, 1)], [0, 1, 14, 15, 16, 17, 18, 19])
    self.assertEqual(kept[(1, 0, 0)], list(range(20)))
    # No head streams (kvpress's default ratio 0): the hand-off keeps everything.
    full = DuoAttentionPolicy(head_scores=cache_policies.duo_head_scores(4, 2), sink_size=2, recent_size=6)
    self.assertFalse(full.mask(CFG).any())
    self.assertTrue(all(len(v) == 20 for v in cache_policies.kept_positions(
        full.compact(prefilled(full, (20,)), capacity=24)).values()))

  def test_on_the_fly_scores_match_kvpress_formula(self):
    rng = np.random.RandomState(0)
    q_mean, k_mean = rng.randn(3, 4, 8), rng.randn(3, 2, 8)
    inv_freq = np.asarray(rope_lib.inv_frequencies(CFG))
    np.testing.assert_allclose(duo_attention.head_scores_from_means(q_mean, k_mean, inv_freq, 50),
                               kvpress_on_the_fly(q_mean, k_mean, inv_freq, 50), rtol=1e-10, atol=1e-12)

  def test_calibrate_uses_each_texts_mean_query_and_key(self):
    prompts = [np.random.RandomState(7).randint(1, 64, n).tolist() for n in (12, 20)]
    got = duo_attention.calibrate(PARAMS, CFG, prompts, q_len=30)
    inv_freq = np.asarray(rope_lib.inv_frequencies(CFG))
    want = np.zeros((4, 2))
    layers = jax.tree.map(np.asarray, PARAMS["layers"])
    for p in prompts:
      options = llama.ForwardOptions(hidden_layers=tuple(range(4)), logits=False)
      hidden = np.asarray(llama.run(PARAMS, jnp.asarray([p]), jnp.arange(len(p))[None], None, CFG,
                                    options=options).hidden)[:, 0]  # [L, T, D]
      h = hidden / np.sqrt(np.mean(hidden ** 2, -1, keepdims=True) + CFG.rms_norm_eps) * layers["attn_norm"][:, None]
      q = np.einsum("ltd,ldhk->lthk", h, layers["wq"]).mean(1)
      k = np.einsum("ltd,ldhk->lthk", h, layers["wk"]).mean(1)
      want += kvpress_on_the_fly(q, k, inv_freq, 30) / len(prompts)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    # The scores are a pattern the policy takes.
    policy = DuoAttentionPolicy(head_scores=tuple(map(tuple, got)), head_compression_ratio=0.25)
    self.assertEqual(int(policy.mask(CFG).sum()), 2)

  def test_bad_patterns_are_named(self):
    with self.assertRaisesRegex(ValueError, r"DuoAttention head_compression_ratio=0.5 needs head_scores"):
      DuoAttentionPolicy(head_compression_ratio=0.5)
    with self.assertRaisesRegex(ValueError, r"DuoAttention head_compression_ratio=1.5 must be a number in"):
      DuoAttentionPolicy(head_scores=((1.0,),), head_compression_ratio=1.5)
    with self.assertRaisesRegex(ValueError, r"DuoAttention head_scores=.* must be a non-empty \[layers\]"):
      DuoAttentionPolicy(head_scores=(1.0, 2.0))
    with self.assertRaisesRegex(ValueError, r"DuoAttention head_scores must hold finite numbers"):
      DuoAttentionPolicy(head_scores=((1.0, float("nan")),))
    with self.assertRaisesRegex(ValueError, r"DuoAttention streaming_heads must hold True/False"):
      DuoAttentionPolicy(streaming_heads=((1, 0),))
    with self.assertRaisesRegex(ValueError, r"DuoAttention streaming_heads is the mask itself"):
      DuoAttentionPolicy(streaming_heads=((True,),), head_scores=((1.0,),))
    with self.assertRaisesRegex(ValueError, r"DuoAttention head_scores=0.3 must be a \[layers\]\[kv_heads\]"):
      DuoAttentionPolicy(head_scores=0.3)
    with self.assertRaisesRegex(ValueError, r"DuoAttention sink_size=-1 must be >= 0"):
      DuoAttentionPolicy(sink_size=-1)
    policy = DuoAttentionPolicy(head_scores=((0.1, 0.2, 0.3),), head_compression_ratio=0.5)
    with self.assertRaisesRegex(ValueError, r"DuoAttention head_scores is \[1\]\[3\] but the model has 4 layers x "
                                            r"2 kv heads"):
      policy.init(CFG, 1, 8)

  def test_registry_sizes_streaming_heads_to_the_budget(self):
    policy = registry.make_policy("duoattention", {"size": 20, "start_size": 4, "head_compression_ratio": 0.5,
                                                   "duo_head_scores": cache_policies.duo_head_scores(4, 2)})
    self.assertEqual((policy.sink_size, policy.recent_size, policy.head_compression_ratio), (4, 16, 0.5))
    self.assertEqual(registry.make_policy("duoattention", {"size": 20}).sink_size, 4)


if __name__ == "__main__":
  absltest.main()
