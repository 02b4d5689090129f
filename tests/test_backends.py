"""The local backend (stop strings, seeded samples, log-probs, raw-prefix continuation, embeddings, cache
policies) and the HTTP backend's offline behaviour; tests/test_serve.py runs the HTTP backend against a real
lacax server."""

from __future__ import annotations

import functools
import json
from typing import Sequence

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import decoders, models

from lacax import generate as generation
from lacax import tokenizer as tokenizer_lib
from lacax.cache.full import FullPolicy
from lacax.hw.backends import base
from lacax.hw.backends import local
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.weights.loader import Model

ALPHABET = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"+-=()<>/_"
SPECIALS = ("<s>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer() -> tokenizer_lib.Tokenizer:
  """A character-level `lacax.tokenizer.Tokenizer` (a merge-free BPE over ALPHABET), with ChatML specials."""
  vocab = {c: i for i, c in enumerate(ALPHABET)}
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIALS])
  return tokenizer_lib.Tokenizer(backend, bos_id=backend.token_to_id("<s>"),
                                 eos_id=backend.token_to_id("<|im_end|>"), add_bos_token=True, chat_template=CHATML)


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0) -> Model:
  """A tiny random model whose vocabulary is exactly the character tokenizer's."""
  tok = char_tokenizer()
  cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=256, name="tiny-char")
  params = llama.init_params(cfg, jax.random.PRNGKey(seed), std=0.2)
  return Model(cfg=cfg, params=params, tokenizer=tok, source="tiny-char-random")


REFERENCE_TOKENS = 32
# Every batch 8 rows wide and every prompt padded to 64 tokens: few compilations for the whole test set.
BACKEND_ARGS = dict(chunk=4, bucket=64, max_batch=8, min_batch=8)


def greedy_ids(model: Model, ids: Sequence[int], max_new_tokens: int) -> list[int]:
  """What `lacax.generate.generate` writes (greedy, stopping at the tokenizer's stop ids).

  Greedy decoding is prefix-consistent, so the first `max_new_tokens` of one REFERENCE_TOKENS-long generation
  are the answer: every reference shares one compilation."""
  if max_new_tokens > REFERENCE_TOKENS:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be <= {REFERENCE_TOKENS}")
  key = (id(model), tuple(ids))
  if key not in _GREEDY:
    _GREEDY[key] = generation.generate(model.params, model.cfg, [list(ids)], max_new_tokens=REFERENCE_TOKENS,
                                       stop_ids=model.tokenizer.stop_ids).tokens[0]
  return _GREEDY[key][:max_new_tokens]


_GREEDY: dict = {}


def forward_logits(model: Model, ids: Sequence[int], width: int = 64) -> np.ndarray:
  """[len(ids), V] logits of one teacher-forced forward (padded to `width`, so that every call shares one
  compilation)."""
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(ids)] = ids
  positions = np.where(np.arange(width) < len(ids), np.arange(width), -1)[None].astype(np.int32)
  return np.asarray(_forward(model.params, jnp.asarray(tokens), jnp.asarray(positions), cfg=model.cfg)[0,
                                                                                                     :len(ids)])


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, tokens, positions, *, cfg):
  logits, _ = llama.forward(params, tokens, positions, FullPolicy().init(cfg, 1, tokens.shape[1]), cfg)
  return logits


def greedy_reference(model: Model, prompt: str, max_new_tokens: int) -> str:
  """The text of `greedy_ids` for a raw prompt."""
  tok = model.tokenizer
  return tok.decode(greedy_ids(model, tok.encode(prompt), max_new_tokens), skip_special_tokens=True)


class LocalBackendTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tiny_model()
    cls.backend = local.LocalBackend(cls.model, **BACKEND_ARGS)
    cls.tok = cls.model.tokenizer

  def test_greedy_equals_generate(self):
    prompts = ["module adder(", "assign y = a"]
    got = self.backend.generate(prompts, base.Sampling(max_tokens=24))
    for prompt, completions in zip(prompts, got):
      self.assertLen(completions, 1)
      self.assertEqual(completions[0].text, greedy_reference(self.model, prompt, 24))
      self.assertEqual(completions[0].finish_reason, "length")
      self.assertLen(completions[0].tokens, 24)

  def test_stop_string_truncates_text_and_stops_decoding(self):
    full = self.backend.generate(["wire x"], base.Sampling(max_tokens=30))[0][0].text
    stop = full[10:12]  # a string the greedy text reaches after a few tokens
    cut = full.index(stop)
    got = self.backend.generate(["wire x"], base.Sampling(max_tokens=30, stop=(stop, "@never@")))[0][0]
    self.assertEqual(got.text, full[:cut])
    self.assertEqual(got.finish_reason, "stop")
    # The kept tokens end with the one that completed the stop string.
    self.assertEqual(self.tok.decode(got.tokens), full[:cut + len(stop)][:len(self.tok.decode(got.tokens))])
    self.assertIn(stop, self.tok.decode(got.tokens))
    self.assertNotIn(stop, self.tok.decode(got.tokens[:-1]))

  def test_stop_token_finishes_with_stop(self):
    # The same model with a tokenizer whose EOS is the third token greedy decoding produces.
    full = self.backend.generate(["abc"], base.Sampling(max_tokens=16))[0][0]
    eos = full.tokens[2]
    tok = tokenizer_lib.Tokenizer(self.tok.backend, bos_id=self.tok.bos_id, eos_id=eos, add_bos_token=True)
    model = Model(cfg=self.model.cfg, params=self.model.params, tokenizer=tok, source="eos-moved")
    got = local.LocalBackend(model, **BACKEND_ARGS).generate(["abc"], base.Sampling(max_tokens=16))[0][0]
    first = full.tokens.index(eos)
    self.assertEqual(got.finish_reason, "stop")
    self.assertEqual(got.tokens, full.tokens[:first + 1])
    self.assertEqual(got.text, self.tok.decode(full.tokens[:first]))

  def test_n_samples_reproduce_by_seed_whatever_the_batch(self):
    sampling = base.Sampling(n=3, temperature=1.0, max_tokens=12, seed=7)
    prompts = ["reg q", "always @", "end"]  # 9 rows: two batches of at most max_batch=8
    first = self.backend.generate(prompts, sampling)
    again = self.backend.generate(prompts, sampling)
    self.assertEqual([[c.tokens for c in p] for p in first], [[c.tokens for c in p] for p in again])
    self.assertLen({c.tokens for c in first[0]}, 3)  # three different samples
    # Sample j is the sample of seed + j alone, in a batch of one.
    alone = self.backend.generate(["always @"], base.Sampling(n=1, temperature=1.0, max_tokens=12, seed=9))
    self.assertEqual(alone[0][0].tokens, first[1][2].tokens)

  def test_logprobs_equal_a_teacher_forced_forward(self):
    prompt = "input clk"
    got = self.backend.generate([prompt], base.Sampling(n=2, temperature=1.0, max_tokens=10, logprobs=True))[0]
    for completion in got:
      ids = self.tok.encode(prompt)
      logp = jax.nn.log_softmax(forward_logits(self.model, ids + list(completion.tokens)), axis=-1)
      want = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(completion.tokens)]
      np.testing.assert_allclose(completion.logprobs, want, atol=1e-4)
    self.assertIsNone(self.backend.generate([prompt], base.Sampling(max_tokens=3))[0][0].logprobs)

  def test_raw_prefix_continuation_equals_generating_from_prompt_plus_prefix(self):
    base.require(self.backend, "raw_prefix")
    chat = [{"role": "user", "content": "write a mux"}]
    first = self.backend.generate([chat], base.Sampling(max_tokens=6))[0][0]
    cue = self.tok.encode("Wait,", add_bos=False)
    got = self.backend.continue_([chat], [list(first.tokens) + cue], base.Sampling(max_tokens=10))[0][0]
    ids = self.tok.encode(self.tok.apply_chat_template(chat), add_bos=False) + list(first.tokens) + cue
    self.assertEqual(list(got.tokens), greedy_ids(self.model, ids, 10))
    # A text prefix is encoded without BOS and appended to the prompt.
    text = self.backend.continue_(["module m"], ["(input"], base.Sampling(max_tokens=8))[0][0]
    self.assertEqual(text.text, greedy_reference(self.model, "module m(input", 8))

  def test_embeddings_mean_and_last_of_final_hidden_states(self):
    got = self.backend.embed(["abc", "hello world"], pooling="mean")
    last = self.backend.embed(["abc", "hello world"], pooling="last")
    self.assertEqual(got.shape, (2, self.model.cfg.hidden_size))
    # Reference: logits = hidden @ unembed^T with a [V > D, D] unembedding, so least squares recovers hidden.
    ids = self.tok.encode("hello world")
    logits = forward_logits(self.model, ids)
    embed = np.asarray(self.model.params["lm_head"], np.float64)
    hidden = np.linalg.lstsq(embed, np.asarray(logits, np.float64).T, rcond=None)[0].T
    np.testing.assert_allclose(got[1], hidden.mean(0), atol=1e-3)
    np.testing.assert_allclose(last[1], hidden[-1], atol=1e-3)
    with self.assertRaisesRegex(ValueError, "pooling='max'"):
      self.backend.embed(["a"], pooling="max")

  def test_overlong_prompt_names_the_context_length(self):
    with self.assertRaisesRegex(ValueError, "maximum context length is 256 tokens"):
      self.backend.generate(["a" * 250], base.Sampling(max_tokens=16))

  def test_any_cache_policy(self):
    from lacax.cache import registry  # pylint: disable=g-import-not-at-top

    backend = local.LocalBackend(self.model, policy=registry.make_policy("streaming", {"size": 12}), bucket=64)
    got = backend.generate(["module top;"], base.Sampling(max_tokens=20))[0][0]
    ids = self.tok.encode("module top;")
    want = generation.generate(self.model.params, self.model.cfg, [ids], max_new_tokens=20,
                               stop_ids=self.tok.stop_ids, policy=backend.policy).tokens[0]
    self.assertEqual(list(got.tokens), want)
    self.assertIn("Streaming", backend.describe()["policy"])


class HttpBackendOfflineTest(absltest.TestCase):
  """What needs no server (the server-facing tests are in tests/test_serve.py, against a real lacax server)."""

  def test_connection_refused_is_retried_and_named(self):
    from lacax.hw.backends import openai_http  # pylint: disable=g-import-not-at-top

    backend = openai_http.OpenAIHTTPBackend("http://127.0.0.1:9/v1", "m", retries=1, backoff=0.01, timeout=1.0)
    with self.assertRaisesRegex(openai_http.BackendHTTPError, r"127\.0\.0\.1:9.*connection failed.*after 2 attempts"):
      backend.generate(["hi"], base.Sampling(max_tokens=4))

  def test_api_key_comes_from_the_environment_and_is_never_shown(self):
    from lacax.hw.backends import openai_http  # pylint: disable=g-import-not-at-top

    with absltest.mock.patch.dict("os.environ", {"MY_KEY": "sk-test"}):
      backend = openai_http.OpenAIHTTPBackend("http://127.0.0.1:9/v1", "m", api_key_env="MY_KEY")
    self.assertEqual(backend.headers()["Authorization"], "Bearer sk-test")
    self.assertNotIn("sk-test", json.dumps(backend.describe()))
    with self.assertRaisesRegex(ValueError, "base_url='localhost:8000' must start with http"):
      openai_http.OpenAIHTTPBackend("localhost:8000", "m")


if __name__ == "__main__":
  absltest.main()
