"""KVzip (lacax/cache/kvzip.py) restated in NumPy on a tiny GQA model.

kvpress `presses/kvzip_press.py`: after the prompt (n tokens), the model reads [repeat prompt, the prompt] at
positions n, n + 1, ...; a prompt key's score is the largest softmax weight any reconstruction query of its
group gives it; the first n_sink score max + 1; the lowest scores over all layers, heads and tokens are evicted
(L * KV * budget kept), or per layer with layerwise. The restatement computes the reconstruction without a cache:
one causal forward per chunk over [prompt, repeat prompt, chunk] at positions 0.., whose queries and keys are
rebuilt in NumPy from each layer's input residual stream.
"""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache import kvzip, registry
from lacax.cache.kvzip import KVzipPolicy
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.model import rope as rope_lib
from lacax.sampling import SamplingConfig
from tests import cache_policies

CFG = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=8)
PARAMS = llama.init_params(CFG, jax.random.PRNGKey(0), std=0.1)
REPEAT, CONTINUE, SUFFIX = (5, 9, 13), (5, 9, 17, 21), (3,)
IDS = dict(repeat_ids=REPEAT, continue_ids=CONTINUE, suffix_ids=SUFFIX)
PROMPTS = [np.random.RandomState(4).randint(1, 64, n).tolist() for n in (30, 21)]


def rope(x, pos):
  """x [T, H, d] rotated at positions pos [T] (the HF / lacax half-split RoPE)."""
  inv = np.asarray(rope_lib.inv_frequencies(CFG), np.float64)
  ang = pos[:, None] * inv[None]
  cos, sin = np.concatenate([np.cos(ang)] * 2, -1)[:, None], np.concatenate([np.sin(ang)] * 2, -1)[:, None]
  half = x.shape[-1] // 2
  return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def numpy_scores(prompt, chunk=None, n_sink=4):
  """[L, n, KV] the max reconstruction attention of every prompt key (kvpress score_kvzip), in NumPy: one pass
  per chunk, each a causal forward over [prompt, its reconstruction input] without a cache."""
  n = len(prompt)
  chunk = chunk or n
  g = CFG.num_heads // CFG.num_kv_heads
  layers = jax.tree.map(lambda a: np.asarray(a, np.float64), PARAMS["layers"])
  options = llama.ForwardOptions(hidden_layers=tuple(range(CFG.num_layers)), logits=False)
  out = np.zeros((CFG.num_layers, n, CFG.num_kv_heads))
  for start in range(0, n, chunk):
    end = min(start + chunk, n)
    head = list(REPEAT) if start == 0 else list(CONTINUE) + list(prompt[max(0, start - min(8, chunk)):start])
    seq = list(prompt) + head + list(SUFFIX) + list(prompt[start:end])
    hidden = np.asarray(llama.run(PARAMS, jnp.asarray([seq]), jnp.arange(len(seq))[None], None, CFG,
                                  options=options).hidden, np.float64)[:, 0]  # [L, T, D]
    pos = np.arange(len(seq), dtype=np.float64)
    key = np.arange(len(seq))
    seen = (key < min(n_sink, start)) | ((key >= start) & (key < end)) | (key >= n)
    for layer in range(CFG.num_layers):
      h = hidden[layer]
      h = h / np.sqrt(np.mean(h ** 2, -1, keepdims=True) + CFG.rms_norm_eps) * layers["attn_norm"][layer]
      q = rope(np.einsum("td,dhk->thk", h, layers["wq"][layer]), pos)
      k = rope(np.einsum("td,dhk->thk", h, layers["wk"][layer]), pos)
      for qh in range(CFG.num_heads):
        kvh = qh // g
        logits = q[n:, qh] @ k[:, kvh].T / np.sqrt(CFG.head_dim)  # reconstruction queries x every key
        logits = np.where(seen[None] & (key[None] <= np.arange(n, len(seq))[:, None]), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[layer, start:end, kvh] = np.maximum(out[layer, start:end, kvh], w[:, start:end].max(0))
  return out


def numpy_kept(scores, budget, n_sink, layerwise):
  """{(layer, kv head): kept positions} of kvpress compress_post (distinct scores)."""
  s = scores.copy()
  s[:, :n_sink] = s.max() + 1.0
  L, n, KV = s.shape
  keep = np.zeros(s.shape, bool)
  if layerwise:
    for layer in range(L):
      flat = s[layer].ravel()
      keep[layer].flat[np.argsort(-flat, kind="stable")[:KV * budget]] = True
  else:
    keep.flat[np.argsort(-s.ravel(), kind="stable")[:L * KV * budget]] = True
  return {(l, h): sorted(np.nonzero(keep[l, :, h])[0].tolist()) for l in range(L) for h in range(KV)}


def handoff(policy, prompts=PROMPTS):
  tokens, lengths = generation.pad_prompts(prompts, bucket=8)
  statics = dict(cfg=CFG, policy=policy, sampling=SamplingConfig(), max_new_tokens=4, stop_ids=())
  state = generation.prefill(PARAMS, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                             decode_capacity=policy.run_capacity(CFG, int(lengths.max()), 4), **statics)
  return state, statics


class KVzipTest(absltest.TestCase):

  def test_reconstruction_scores_match_numpy(self):
    tokens, lengths = generation.pad_prompts(PROMPTS, bucket=8)
    for chunk in (None, 12, 5):  # one pass; three and two passes; chunks shorter than kvpress's 8-token postfix
      policy = KVzipPolicy(budget=8, chunk_size=chunk, **IDS)
      cache = policy.init(CFG, 2, tokens.shape[1])
      _, cache = generation.prefill_forward(PARAMS, jnp.asarray(tokens), jnp.asarray(lengths), cache, CFG)
      got = np.asarray(jax.jit(policy.after_prefill, static_argnums=1)(
          PARAMS, CFG, cache, jnp.asarray(tokens), jnp.asarray(lengths)).scores)
      for row, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(got[:, row, :len(prompt)], numpy_scores(prompt, chunk), rtol=2e-4, atol=1e-6,
                                   err_msg=f"chunk {chunk}, row {row}")
        np.testing.assert_array_equal(got[:, row, len(prompt):], 0.0)

  def test_handoff_keeps_kvpress_selection(self):
    for layerwise in (False, True):
      policy = KVzipPolicy(budget=8, layerwise=layerwise, n_sink=2, chunk_size=16, **IDS)
      state, _ = handoff(policy)
      kept = cache_policies.kept_positions(state.cache)
      for row, prompt in enumerate(PROMPTS):
        want = numpy_kept(numpy_scores(prompt, 16, n_sink=2), 8, 2, layerwise)
        got = {(l, h): kept[(l, row, h)] for l in range(4) for h in range(2)}
        self.assertEqual(got, want, f"layerwise={layerwise}, row {row}")
        counts = [len(v) for v in got.values()]
        self.assertEqual(sum(counts), 4 * 2 * 8)
        if not layerwise:  # one budget over every layer: the layers keep different numbers
          self.assertGreater(len(set(counts)), 1)
      self.assertIsNone(state.cache.scores)  # the decode cache records nothing

  def test_every_prefill_path_scores(self):
    policy = KVzipPolicy(budget=8, **IDS)
    state, statics = handoff(policy)
    want = np.asarray(generation.decode(PARAMS, state, pad_id=0, **statics).out)
    got = generation.oneshot_generate(PARAMS, CFG, PROMPTS, {"kvzip": policy}, max_new_tokens=4, bucket=8)
    self.assertEqual(got.tokens["kvzip"], want.tolist())
    cache = policy.init(CFG, 1, 32)
    with self.assertRaisesRegex(ValueError, r"KVzip.compact needs the reconstruction scores: run "
                                            r"policy.after_prefill"):
      policy.compact(cache, capacity=32)

  def test_repeat_prompt_ids_and_inputs(self):
    vocab = {kvzip.REPEAT_PROMPT: [3, 4], kvzip.CONTINUE_PROMPT: [3, 5], "\n": [9]}
    self.assertEqual(kvzip.repeat_prompt_ids(vocab.__getitem__),
                     {"repeat_ids": (3, 4), "continue_ids": (3, 5), "suffix_ids": (9,)})
    tokens, lengths = jnp.asarray([[1, 2, 6, 4], [7, 8, 0, 0]]), jnp.asarray([4, 2])
    ids, pos = kvzip.reconstruction_inputs(tokens, lengths, 0, 2, (3, 4), (9,), 0)
    np.testing.assert_array_equal(ids, [[3, 4, 9, 1, 2], [3, 4, 9, 7, 8]])
    np.testing.assert_array_equal(pos, [[4, 5, 6, 7, 8], [2, 3, 4, 5, 6]])
    # The second chunk: the continuation prompt, the first chunk's last token, the suffix, the chunk; row 1 has
    # no second chunk and feeds nothing.
    ids, pos = kvzip.reconstruction_inputs(tokens, lengths, 2, 2, (3, 5), (9,), 1)
    np.testing.assert_array_equal(ids, [[3, 5, 2, 9, 6, 4], [0] * 6])
    np.testing.assert_array_equal(pos, [[4, 5, 6, 7, 8, 9], [-1] * 6])

  def test_bad_fields_are_named(self):
    with self.assertRaisesRegex(ValueError, r"KVzip budget=0 must be >= 1"):
      KVzipPolicy(budget=0)
    with self.assertRaisesRegex(ValueError, r"KVzip repeat_ids='Repeat' must be a tuple of token ids"):
      KVzipPolicy(budget=4, repeat_ids="Repeat")
    with self.assertRaisesRegex(ValueError, r"KVzip suffix_ids=\(-1,\) must be a tuple of token ids"):
      KVzipPolicy(budget=4, suffix_ids=(-1,))
    with self.assertRaisesRegex(ValueError, r"KVzip chunk_size=0 must be >= 1"):
      KVzipPolicy(budget=4, chunk_size=0)
    with self.assertRaisesRegex(ValueError, r"KVzip layerwise=1 must be True or False"):
      KVzipPolicy(budget=4, layerwise=1)
    with self.assertRaisesRegex(ValueError, r"KVzip rope_mode='slot' must be 'original' or 'stored'"):
      KVzipPolicy(budget=4, rope_mode="slot")
    policy = registry.make_policy("kvzip", {"size": 12, "kvzip_repeat_ids": [1, 2], "kvzip_layerwise": True,
                                            "kvzip_chunk_size": 512})
    self.assertEqual((policy.budget, policy.repeat_ids, policy.layerwise, policy.n_sink, policy.chunk_size),
                     (12, (1, 2), True, 4, 512))


if __name__ == "__main__":
  absltest.main()
