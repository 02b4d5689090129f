"""ACT: calibration vs a numpy statement of the reference formula, hooks in the model, head search, task loaders."""

import json
import os
import tempfile

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from lacax.act import calibration as cal
from lacax.act import search
from lacax.act import tasks
from lacax.cache.kv_cache import init_cache
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.weights import hf
from tests import hf_models

_forward = jax.jit(llama.forward, static_argnames=("cfg", "probs_hook"))


def reference_act(attention: np.ndarray, beta: float, threshold: float, first_row: str = "reference"
                  ) -> np.ndarray:
  """GATECH-EIC/ACT `atten_process_eval` on one head's [q_len, k_len] map, stated in numpy.

  first_row="reference" is the code as shipped; "consistent" zeroes the sink columns of every row (row 0
  included) when computing the proportions and drops the final A[0, 0] = 1.
  """
  a = np.array(attention, np.float32)
  q_len = a.shape[0]
  score = a.sum(0) / np.arange(q_len, 0, -1, dtype=np.float32)  # broadcasts to k_len when q_len == 1
  sinks = np.nonzero(score > threshold)[0][1:]
  proportions = a.copy()
  freed = a[:, sinks].sum(1, keepdims=True) * (1 - beta)
  a[:, sinks] *= beta
  if first_row == "reference":
    proportions[1:, sinks] = 0
  else:
    proportions[:, sinks] = 0
  a = a + freed * (proportions / proportions.sum(1, keepdims=True))
  if first_row == "reference":
    a[0, 0] = 1
  return a


def _causal_softmax(logits: np.ndarray, query_offset: int = 0) -> np.ndarray:
  """Row-wise softmax of [T, S] logits under a causal mask (query t at position query_offset + t)."""
  t, s = logits.shape
  visible = np.arange(s)[None, :] <= (query_offset + np.arange(t))[:, None]
  z = np.where(visible, logits, -np.inf)
  z = np.exp(z - z.max(1, keepdims=True))
  return (z / z.sum(1, keepdims=True)).astype(np.float32)


def _attention_with_sinks(rng: np.random.RandomState, q_len: int, k_len: int) -> np.ndarray:
  """A causal attention map with a BOS sink and two planted hidden sinks among random logits."""
  logits = rng.randn(q_len, k_len) * 1.5
  logits[:, 0] += 3.0
  logits[:, rng.choice(np.arange(1, k_len), 2, replace=False)] += 3.0
  return _causal_softmax(logits, query_offset=k_len - q_len)


def _threshold(cfg: cal.ACTConfig, k_len: int) -> float:
  return cfg.threshold if cfg.threshold_mode == "absolute" else cfg.alpha / k_len


def _clear_of_threshold(attention: np.ndarray, threshold: float) -> bool:
  """Float32 summation order cannot flip a detection: every score is 1e-4 away from the threshold."""
  score = attention.sum(0) / np.arange(attention.shape[0], 0, -1)
  return bool(np.min(np.abs(score - threshold)) > 1e-4)


def _maps(cfg: cal.ACTConfig, q_len: int, k_len: int, count: int) -> list[np.ndarray]:
  rng, out = np.random.RandomState(q_len * 100 + k_len), []
  while len(out) < count:
    attention = _attention_with_sinks(rng, q_len, k_len)
    if _clear_of_threshold(attention, _threshold(cfg, k_len)):
      out.append(attention)
  return out


_MODES = (("absolute", cal.ACTConfig()), ("alpha_over_n", cal.ACTConfig(threshold_mode="alpha_over_n", alpha=3.0)))


class CalibrationTest(parameterized.TestCase):

  @parameterized.named_parameters(*_MODES)
  def test_prefill_equals_reference_in_both_first_row_modes(self, cfg):
    detected = 0
    for attention in _maps(cfg, 24, 24, 6):
      want = reference_act(attention, cfg.beta, _threshold(cfg, 24))
      visible = np.tril(np.ones((24, 24), bool))
      for first_row in cal.FIRST_ROW_MODES:
        got = cal.calibrate_probs(jnp.asarray(attention), visible, cfg.replace(first_row=first_row))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)
      inferred = cal.calibrate_probs(jnp.asarray(attention), None, cfg)  # visibility read off the zeros
      np.testing.assert_allclose(np.asarray(inferred), want, atol=2e-6, rtol=0)
      detected += int(np.asarray(cal.hidden_sinks(jnp.asarray(attention), visible, cfg)).sum())
      np.testing.assert_allclose(want.sum(1), 1.0, atol=1e-5)
    self.assertGreater(detected, 6)  # the maps do have hidden sinks to calibrate

  @parameterized.named_parameters(*_MODES)
  def test_decode_row_is_its_own_sink_score(self, cfg):
    """q_len = 1: the reference's first-row quirk applies; "consistent" keeps the row a distribution."""
    for attention in _maps(cfg, 1, 40, 6):
      visible = np.ones((1, 40), bool)
      quirk = cal.calibrate_probs(jnp.asarray(attention), visible, cfg.replace(first_row="reference"))
      np.testing.assert_allclose(np.asarray(quirk), reference_act(attention, cfg.beta, _threshold(cfg, 40)),
                                 atol=2e-6, rtol=0)
      consistent = np.asarray(cal.calibrate_probs(jnp.asarray(attention), visible, cfg))
      np.testing.assert_allclose(
          consistent, reference_act(attention, cfg.beta, _threshold(cfg, 40), "consistent"), atol=2e-6, rtol=0)
      np.testing.assert_allclose(consistent.sum(-1), 1.0, atol=1e-5)
      self.assertEqual(float(np.asarray(quirk)[0, 0]), 1.0)  # the reference's A[0, 0] = 1 overwrite
      self.assertGreater(float(np.asarray(quirk).sum()), 1.01)  # ... which breaks the row sum in decode

  @parameterized.named_parameters(*_MODES)
  def test_batched_padded_gqa_equals_reference_per_head(self, cfg):
    batch, kv_heads, groups, width = 2, 2, 3, 20
    lengths = [20, 14]
    rng = np.random.RandomState(7)
    probs = np.zeros((batch, kv_heads, groups, width, width), np.float32)
    for b, n in enumerate(lengths):
      for k in range(kv_heads):
        for g in range(groups):
          while True:
            attention = _attention_with_sinks(rng, n, n)
            if _clear_of_threshold(attention, _threshold(cfg, n)):
              break
          probs[b, k, g, :n, :n] = attention
      probs[b, :, :, n:, :] = 1.0 / width  # padding queries: uniform over every slot, as llama.attention gives
    positions = np.where(np.arange(width)[None] < np.array(lengths)[:, None], np.arange(width)[None], -1)
    visible = cal.visibility_from_positions(jnp.asarray(positions), jnp.asarray(positions))
    got = np.asarray(cal.calibrate_probs(jnp.asarray(probs), visible, cfg))
    inferred = np.asarray(cal.calibrate_probs(jnp.asarray(probs), None, cfg))
    np.testing.assert_array_equal(inferred, got)
    for b, n in enumerate(lengths):
      for k in range(kv_heads):
        for g in range(groups):
          want = reference_act(probs[b, k, g, :n, :n], cfg.beta, _threshold(cfg, n))
          np.testing.assert_allclose(got[b, k, g, :n, :n], want, atol=2e-6, rtol=0)
          np.testing.assert_array_equal(got[b, k, g, :n, n:], 0.0)
      np.testing.assert_array_equal(got[b, :, :, n:], probs[b, :, :, n:])  # padding rows untouched
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)

  def test_rows_sum_to_one_and_sinks_shrink_by_beta(self):
    rng = np.random.RandomState(3)
    cfg = cal.ACTConfig(beta=0.25)
    probs = np.stack([_attention_with_sinks(rng, 32, 32) for _ in range(8)])
    visible = np.tril(np.ones((32, 32), bool))
    out = np.asarray(cal.calibrate_probs(jnp.asarray(probs), visible, cfg))
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    sinks = np.asarray(cal.hidden_sinks(jnp.asarray(probs), jnp.broadcast_to(visible, probs.shape), cfg))
    self.assertGreater(sinks.sum(), 0)
    for i, j in zip(*np.nonzero(sinks)):
      np.testing.assert_allclose(out[i, :, j], 0.25 * probs[i, :, j], rtol=1e-6)
    others = np.broadcast_to(~sinks[:, None, :], out.shape)
    self.assertTrue(np.all((out - probs)[others] >= -1e-7))  # non-sink columns only ever gain

  def test_config_validation_names_field_and_value(self):
    for kwargs, message in ((dict(beta=1.5), "beta=1.5"), (dict(threshold_mode="mean"), "threshold_mode='mean'"),
                            (dict(threshold=0.0), "threshold=0.0"), (dict(alpha=-1.0), "alpha=-1.0"),
                            (dict(first_row="zero"), "first_row='zero'"), (dict(heads={(1, -2)}), "(1, -2)"),
                            (dict(heads=[[0.5, 1.0]]), "heads=")):
      with self.assertRaisesRegex(ValueError, message.replace("(", r"\(").replace(")", r"\)")):
        cal.ACTConfig(**kwargs)
    with self.assertRaisesRegex(ValueError, r"\(layer=4, head=0\).*3 layers x 4 heads"):
      cal.ACTConfig(heads={(4, 0)}).head_mask(3, 4)
    with self.assertRaisesRegex(ValueError, r"shape \(2, 2\).*\(3, 4\)"):
      cal.ACTConfig(heads=np.eye(2, dtype=bool)).head_mask(3, 4)
    as_set = cal.ACTConfig(heads={(0, 1), (2, 3)})
    as_mask = cal.ACTConfig(heads=as_set.head_mask(3, 4))
    self.assertEqual(as_mask.head_set, as_set.head_set)
    self.assertEqual(hash(as_set), hash(cal.ACTConfig(heads=[(2, 3), (0, 1)])))

  def test_heads_json_round_trip(self):
    path = os.path.join(tempfile.mkdtemp(), "heads.json")
    cal.save_heads(path, {(2, 1), (0, 3)}, 3, 4, note="x")
    self.assertEqual(cal.load_heads(path, 3, 4), frozenset({(2, 1), (0, 3)}))
    with open(path) as f:
      self.assertEqual(json.load(f)["mask"][2], [0, 1, 0, 0])
    with self.assertRaisesRegex(ValueError, "num_layers=3, the model has 30"):
      cal.load_heads(path, 30, 4)


def _tiny():
  path, torch_model = hf_models.saved_model("llama_tied")
  cfg, params = hf.load_hf_checkpoint(path)
  return cfg, jax.tree.map(jnp.asarray, params), torch_model


def _prefill(params, cfg, tokens, hook=None):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits, _ = _forward(params, jnp.asarray(tokens), positions, init_cache(cfg, tokens.shape[0], tokens.shape[1]),
                       cfg=cfg, probs_hook=hook)
  return np.asarray(logits)


class HookTest(parameterized.TestCase):

  def test_hook_touches_only_the_selected_query_head(self):
    model_cfg = ModelConfig(vocab_size=11, hidden_size=48, intermediate_size=8, num_layers=3, num_heads=6,
                            num_kv_heads=2)  # G = 3: query head 4 is (kv 1, g 1)
    rng = np.random.RandomState(0)
    probs = np.stack([[[_attention_with_sinks(rng, 12, 12) for _ in range(3)] for _ in range(2)]
                      for _ in range(2)])  # [B, KV, G, T, S]
    act = cal.ACTConfig(heads={(1, 4)})
    hook = cal.make_probs_hook(act, model_cfg)
    visible = np.tril(np.ones((12, 12), bool))
    for layer in range(3):
      out = np.asarray(hook(jnp.asarray(probs), jnp.int32(layer)))
      selected = np.zeros(probs.shape[:3], bool)
      if layer == 1:
        selected[:, 1, 1] = True
        want = np.asarray(cal.calibrate_probs(jnp.asarray(probs[:, 1, 1]), visible, act))
        np.testing.assert_allclose(out[:, 1, 1], want, atol=1e-7, rtol=0)
        self.assertGreater(np.abs(want - probs[:, 1, 1]).max(), 1e-3)
      np.testing.assert_array_equal(out[~selected], probs[~selected])

  def test_empty_head_set_is_bit_identical(self):
    cfg, params, _ = _tiny()
    self.assertIsNone(cal.make_probs_hook(cal.ACTConfig(), cfg))
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 16))
    plain = _prefill(params, cfg, tokens)
    np.testing.assert_array_equal(_prefill(params, cfg, tokens, cal.make_probs_hook(cal.ACTConfig(), cfg)), plain)
    # The sweep's traced path with nothing selected skips the calibration in every layer.
    zero = tasks.predict_batch(params, jnp.asarray(tokens), jnp.array([16, 16]), jnp.zeros((2, 1), jnp.int32),
                               jnp.zeros((cfg.num_layers, cfg.num_heads)), cfg=cfg, act=cal.ACTConfig())
    off = tasks.predict_batch(params, jnp.asarray(tokens), jnp.array([16, 16]), jnp.zeros((2, 1), jnp.int32),
                              cfg=cfg)
    chex.assert_trees_all_equal(zero, off)

  def test_static_and_traced_head_sets_agree(self):
    cfg, params, _ = _tiny()
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (3, 16)))
    lengths = jnp.array([16, 9, 12])
    act = cal.ACTConfig(heads={(1, 0), (2, 3)})

    @jax.jit
    def logits(params, tokens, lengths):
      select = jnp.asarray(act.head_mask(3, 4), jnp.float32)
      return (tasks.prefill_last_logits(params, tokens, lengths, cfg, lambda v: cal.make_probs_hook(act, cfg, v)),
              tasks.prefill_last_logits(params, tokens, lengths, cfg,
                                        lambda v: cal.make_traced_probs_hook(select, act, cfg, v)),
              tasks.prefill_last_logits(params, tokens, lengths, cfg))

    static, traced, plain = map(np.asarray, logits(params, tokens, lengths))
    np.testing.assert_allclose(static, traced, atol=1e-6, rtol=0)
    self.assertGreater(np.abs(static - plain).max(), 1e-4)

  def test_forward_matches_transformers_with_reference_act_in_eager_attention(self):
    """End to end: lacax forward + hook vs HF eager attention patched the way the reference patches it."""
    cfg, params, torch_model = _tiny()
    heads = {(0, 1), (1, 3), (2, 2)}  # query heads 1 and 3 are in different KV groups (G = 2)
    act = cal.ACTConfig(heads=heads)

    def act_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
      del attention_mask, dropout, kwargs  # batch 1, unpadded prefill: the causal mask is all there is
      groups = module.num_key_value_groups
      key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
      logits = torch.matmul(query, key.transpose(2, 3)) * scaling
      t = logits.shape[-1]
      logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
      probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
      for layer, head in heads:
        if layer == module.layer_idx:
          probs[0, head] = torch.from_numpy(reference_act(probs[0, head].numpy(), act.beta, act.threshold))
      return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    transformers.AttentionInterface.register("lacax_act_test", act_eager)
    tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (1, 20))
    previous = torch_model.config._attn_implementation
    try:
      torch_model.set_attn_implementation("lacax_act_test")
      with torch.no_grad():
        want = torch_model(torch.tensor(tokens)).logits.numpy()
    finally:
      torch_model.set_attn_implementation(previous)
    got = _prefill(params, cfg, tokens, cal.make_probs_hook(act, cfg))
    plain = _prefill(params, cfg, tokens)
    self.assertGreater(np.abs(want - plain).max(), 1e-3)  # the calibration matters for these logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


class _CharTokenizer:
  """A character-level stand-in tokenizer: id = index in a fixed alphabet (no BOS)."""

  alphabet = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"+-=()"

  def encode(self, text, add_bos=None):
    del add_bos
    return [self.alphabet.index(c) for c in text]

  def decode(self, ids, skip_special_tokens=True):
    del skip_special_tokens
    return "".join(self.alphabet[i] for i in ids)


class TaskScoringTest(parameterized.TestCase):

  def test_batched_padded_scoring_equals_one_by_one_with_and_without_act(self):
    cfg, params, _ = _tiny()
    tok = _CharTokenizer()
    # Three prompt lengths, so that the one-by-one pass compiles few shapes.
    examples = [tasks.Example(f"review {i}: {'good' if i % 3 else 'bad!'}\nlabel:", i % 2, (" x", " y"),
                              "label_words", "toy") for i in range(7)]
    examples += [tasks.format_mc(tasks.MCItem("Pick.", f"q{i}?", ("ab", "cd", "ef"), i % 3, option_prefix=""),
                                 "options", "mc") for i in range(4)]
    examples += [tasks.format_mc(tasks.MCItem("Pick.", f"r{i}?", ("u", "v"), i % 2), "generate", "gen")
                 for i in range(3)]
    batched = tasks.encode_split(examples, tok, batch_size=4, bucket=64)  # one width: few compiles
    single = tasks.encode_split(examples, tok, batch_size=1, bucket=1)  # no padding at all
    self.assertGreater(sum((b.index < 0).sum() for b in batched.batches), 0)  # filler rows exercised
    act = cal.ACTConfig(heads={(1, 0), (2, 1), (0, 3)})
    want = tasks.predictions(params, cfg, single, act=act)
    np.testing.assert_array_equal(tasks.predictions(params, cfg, batched, act=act), want)
    traced = tasks.predictions(params, cfg, batched, act=cal.ACTConfig(), select=act.head_mask(3, 4))
    np.testing.assert_array_equal(traced, want)

  def test_padding_does_not_leak_into_calibration(self):
    """Logits of right-padded rows under ACT equal those of each row run alone without padding."""
    cfg, params, _ = _tiny()
    act = cal.ACTConfig(heads={(0, 0), (1, 1), (2, 3)})
    make_hook = lambda v: cal.make_probs_hook(act, cfg, v)
    tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (3, 16))
    lengths = np.array([16, 7, 11])
    padded = np.asarray(jax.jit(lambda p, t, n: tasks.prefill_last_logits(p, t, n, cfg, make_hook))(
        params, jnp.asarray(tokens), jnp.asarray(lengths)))
    plain = np.asarray(tasks.prefill_last_logits(params, jnp.asarray(tokens), jnp.asarray(lengths), cfg))
    self.assertGreater(np.abs(padded - plain).max(), 1e-4)
    for row, n in enumerate(lengths):
      alone = tasks.prefill_last_logits(params, jnp.asarray(tokens[row:row + 1, :n]), jnp.array([n]), cfg, make_hook)
      np.testing.assert_allclose(padded[row], np.asarray(alone)[0], atol=2e-5, rtol=0)

  def test_candidate_tokens(self):
    tok = _CharTokenizer()
    prompt_ids = tok.encode("p =")
    label = tasks.Example("p =", 0, (" ab", " cd"), "label_words", "t")  # the reference's last token
    self.assertEqual(tasks.candidate_token_ids(label, tok, prompt_ids), tok.encode("bd"))
    option = tasks.Example("p = ", 0, ("12", "34"), "options", "t")  # the first token after the prompt
    self.assertEqual(tasks.candidate_token_ids(option, tok, tok.encode("p = ")), tok.encode("13"))
    letters = tasks.Example("p", 1, ("A", "B"), "letters", "t")
    self.assertEqual(tasks.candidate_token_ids(letters, tok, tok.encode("p")), tok.encode("AB"))

  def test_candidate_tokens_must_differ(self):
    tok = _CharTokenizer()
    with self.assertRaisesRegex(ValueError, "share a token"):
      tasks.candidate_token_ids(tasks.Example("p:", 0, (" ab", " cb"), "label_words", "t"), tok, [0])


_RECORDS = {
    "sst2": ({"sentence": "a gorgeous film", "label": 1, "idx": 0},
             "Sentence: a gorgeous film \nSentiment: ", 1),
    "sst5": ({"text": "dull and slow", "label": 0, "label_text": "very negative"},
             "Sentence: dull and slow \nSentiment: ", 0),
    "MR": ({"text": "a triumph", "label": 1}, "Review: a triumph \nSentiment: ", 1),
    "SUBJ": ({"text": "the film opens in 1950", "label": 0, "label_text": "objective"},
             "Input: the film opens in 1950 \nType: ", 0),
    "AGNews": ({"text": "Stocks rally on Wall St.", "label": 2}, "Article: Stocks rally on Wall St. \nCategory: ", 2),
    "TREC": ({"text": "How far is it from Denver to Aspen ?", "coarse_label": 5, "fine_label": 40},
             "Question: How far is it from Denver to Aspen ? \nType: ", 5),
    "CB": ({"premise": "It rained.", "hypothesis": "The ground is wet", "idx": 0, "label": 2},
           "Premise: It rained. Hypothesis: The ground is wet. Answer: ", 2),
    "BoolQ": ({"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": True},
              "Text: The sky is blue. Question: is the sky blue? \nAnswer: ", 1),
    "DBPedia": ({"label": 0, "title": "E. D. Abbott Ltd", "content": " Abbott of Farnham"},
                "Input:  Abbott of Farnham \nType: ", 0),
    "hellaswag": ({"ctx": "A man is sitting on a roof. he", "endings": ["starts pulling up roofing.", "is ugly.",
                                                                        "sings.", "falls."], "label": "0"},
                  "A man is sitting on a roof. he\nA. starts pulling up roofing.\nB. is ugly.\nC. sings.\nD. falls."
                  "\nAnswer:", 0),
    "ARCE": ({"id": "x", "question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock", "wood"],
                                                                     "label": ["1", "2", "3", "4"]},
              "answerKey": "2"}, "Which is a gas?\nA. ice\nB. steam\nC. rock\nD. wood\nAnswer:", 1),
    "ARCC": ({"id": "y", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
              "answerKey": "C"}, "Q?\nA. a\nB. b\nC. c\nAnswer:", 2),
    "PIQA": ({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             "Open a jar\nA. Twist the lid.\nB. Eat the lid.\nAnswer:", 0),
    "OB": ({"id": "z", "question_stem": "The sun is", "choices": {"text": ["cold", "hot", "wet", "blue"],
                                                                  "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
           "The sun is\nA. cold\nB. hot\nC. wet\nD. blue\nAnswer:", 1),
    "COPA": ({"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
              "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0},
             "My body cast a shadow over the grass. What is the cause?\nA. The sun was rising.\nB. The grass was "
             "cut.\nAnswer:", 0),
    "CQA": ({"id": "w", "question": "Where do fish live?", "question_concept": "fish",
             "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["sea", "sky", "desk", "car", "moon"]},
             "answerKey": "A"}, "Where do fish live?\nA. sea\nB. sky\nC. desk\nD. car\nE. moon\nAnswer:", 0),
}


class ReferenceLoaderTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in _RECORDS)
  def test_parses_jsonl_line(self, name):
    record, expected_text, expected_label = _RECORDS[name]
    fmt = tasks.CLASSIFICATION_FORMATS.get(name) or tasks.MULTIPLE_CHOICE_FORMATS[name]
    folder = os.path.join(tempfile.mkdtemp(), name)
    os.makedirs(folder)
    other = dict(record, idx=1) if "idx" in record else dict(record, extra=1)
    for split, rows in (("train", [record, other]), (fmt.evaluation_split, [record])):
      with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = tasks.load_reference_task(name, os.path.dirname(folder), num_calibration=1, seed=0)
    self.assertLen(task.calibration, 1)
    (example,) = task.evaluation
    self.assertEqual(example.label, expected_label)
    if name in tasks.CLASSIFICATION_FORMATS:
      self.assertEqual(example.prompt, fmt.instruction + expected_text)
      self.assertEqual(example.candidates, fmt.labels)
    else:
      self.assertEqual(example.prompt, fmt.instruction + "\n\n" + expected_text)
      self.assertEqual(example.scoring, "generate")

  def test_errors_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "sst2 record lacks field 'sentence'"):
      tasks.reference_example("sst2", {"text": "x", "label": 0})
    with self.assertRaisesRegex(ValueError, "data set 'imdb' is unknown"):
      tasks.reference_example("imdb", {})
    with self.assertRaisesRegex(ValueError, "answerKey 'Z'"):
      tasks.reference_example("ARCE", {"question": "q", "choices": {"text": ["a"]}, "answerKey": "Z"})
    path = os.path.join(tempfile.mkdtemp(), "bad.jsonl")
    with open(path, "w") as f:
      f.write('{"a": 1}\n{oops\n')
    with self.assertRaisesRegex(ValueError, "bad.jsonl, line 2: invalid JSON"):
      tasks.read_jsonl(path)

  def test_trailing_space_option(self):
    record = _RECORDS["sst2"][0]
    self.assertTrue(tasks.reference_example("sst2", record).prompt.endswith("Sentiment: "))
    self.assertTrue(tasks.reference_example("sst2", record, strip_trailing_space=True).prompt.endswith(
        "Sentiment:"))


class OfflineTaskTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in tasks.OFFLINE_TASKS)
  def test_deterministic_disjoint_and_balanced(self, name):
    task = tasks.offline_task(name, num_calibration=60, num_evaluation=120, seed=3)
    again = tasks.offline_task(name, num_calibration=60, num_evaluation=120, seed=3)
    other = tasks.offline_task(name, num_calibration=60, num_evaluation=120, seed=4)
    self.assertEqual(task, again)
    self.assertNotEqual(task.evaluation, other.evaluation)
    prompts = [e.prompt for e in task.calibration + task.evaluation]
    self.assertLen(set(prompts), 180)
    labels = np.bincount([e.label for e in task.evaluation], minlength=len(task.evaluation[0].candidates))
    self.assertTrue(np.all(labels > 0), labels)
    for example in task.evaluation:
      self.assertEqual(example.task, name)

  def test_letter_formats_and_errors(self):
    task = tasks.offline_task("capitals", num_calibration=0, num_evaluation=3, scoring="letters")
    self.assertTrue(task.evaluation[0].prompt.endswith("\nAnswer:"))
    self.assertEqual(task.evaluation[0].candidates, ("A", "B", "C", "D"))
    with self.assertRaisesRegex(ValueError, "offline task 'nope' is unknown"):
      tasks.offline_task("nope")
    with self.assertRaisesRegex(ValueError, "yields only"):
      tasks.offline_task("animal_class", num_calibration=400, num_evaluation=400)


class SearchTest(parameterized.TestCase):
  """A toy attention-only model where damping the hidden sink of one head provably fixes examples."""

  layers, kv_heads, groups, width, classes = 3, 2, 2, 12, 3
  planted = (1, 2)

  def _toy(self):
    """Per head: attention [B, KV, G, T, S] (softmax of planted logits) and values [B, KV, G, S, C].

    Planted head, "fix" examples: BOS (value 0) + a hidden sink holding a wrong class + six tokens holding the
    right class; last row: BOS .21, sink .43, right-class tokens .29 in all -> wrong. After ACT (beta .4) the
    sink keeps .17 and the right class gets .29 + .26 * .29 / .57 = .42 -> right. "Break" examples have the
    classes swapped, so ACT on that head breaks them; with 12 fix and 4 break examples its net gain is +8.
    Other heads: half have a slightly weaker sink of the same kind but zero values (ACT moves mass but changes
    nothing), half attend almost only to BOS (no hidden sink: ACT is the identity there).
    """
    rng = np.random.RandomState(0)
    num_fix, num_break = 12, 4
    batch = num_fix + num_break
    shape = (batch, self.kv_heads, self.groups, self.width, self.width)
    probs = np.zeros((self.layers, *shape), np.float32)
    values = np.zeros((self.layers, batch, self.kv_heads, self.groups, self.width, self.classes), np.float32)
    labels = rng.randint(0, self.classes, batch)
    for b in range(batch):
      sink = rng.randint(1, 4)
      wrong = (labels[b] + 1 + rng.randint(0, self.classes - 1)) % self.classes
      sink_class, spread_class = (wrong, labels[b]) if b < num_fix else (labels[b], wrong)
      sinky = np.zeros((self.width, self.width))
      sinky[:, 0], sinky[:, sink], sinky[:, 6:] = 2.5, 3.2, 1.0
      weaker = sinky.copy()
      weaker[:, sink] = 2.9
      bos_only = np.zeros((self.width, self.width))
      bos_only[:, 0] = 4.0
      for layer in range(self.layers):
        for head in range(self.kv_heads * self.groups):
          kv, g = divmod(head, self.groups)
          if (layer, head) == self.planted:
            probs[layer, b, kv, g] = _causal_softmax(sinky)
            values[layer, b, kv, g, sink, sink_class] = 1.0
            values[layer, b, kv, g, 6:, spread_class] = 1.0
          elif head % 2:
            probs[layer, b, kv, g] = _causal_softmax(weaker)
          else:
            probs[layer, b, kv, g] = _causal_softmax(bos_only)
            values[layer, b, kv, g, 1:, rng.randint(self.classes)] = 0.01
    return probs, values, labels, num_fix, num_break

  def _evaluator(self, act):
    probs, values, labels, _, _ = self._toy()
    model_cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=self.layers,
                            num_heads=self.kv_heads * self.groups, num_kv_heads=self.kv_heads)
    visible = jnp.asarray(np.tril(np.ones((self.width, self.width), bool)))[None]

    @jax.jit
    def count(select):
      hook = cal.make_traced_probs_hook(select, act, model_cfg, visible)
      evidence = 0.0
      for layer in range(self.layers):
        p = hook(jnp.asarray(probs[layer]), jnp.int32(layer))
        evidence = evidence + jnp.einsum("bkgs,bkgsc->bc", p[..., -1, :], values[layer])
      return jnp.sum(jnp.argmax(evidence, -1) == labels)

    return lambda select: int(count(jnp.asarray(select))), probs, visible

  @parameterized.parameters("independent", "greedy")
  def test_finds_the_planted_head(self, mode):
    act = cal.ACTConfig()
    evaluate, probs, visible = self._evaluator(act)
    shape = (self.layers, self.kv_heads * self.groups)
    activity = np.asarray(cal.freed_mass(jnp.asarray(probs), visible, act)).sum(axis=(1, 4)).reshape(shape)
    candidates = search.candidate_heads(*shape, layers=range(self.layers))
    result = search.search_heads(evaluate, shape, candidates, total=16, mode=mode, activity=activity)
    self.assertEqual(result.heads, frozenset({self.planted}))
    self.assertEqual(result.baseline, 4)  # only the "break" examples are right before calibration
    self.assertEqual(result.single[self.planted], 12)  # +12 fixed, -4 broken
    self.assertEqual(result.combined, 12)
    # Heads without a hidden sink were pruned (ACT is the identity there); the others were measured: no gain.
    self.assertCountEqual(result.pruned, [(l, h) for l in range(3) for h in (0, 2) if (l, h) != self.planted])
    for head, correct in result.single.items():
      if head != self.planted:
        self.assertEqual(correct, result.baseline)
    capped = search.search_heads(evaluate, shape, candidates, total=16, mode=mode, activity=activity,
                                 max_candidates=1)  # the planted head moves the most attention mass
    self.assertEqual(capped.heads, frozenset({self.planted}))
    self.assertCountEqual(capped.capped, [(l, h) for l in range(3) for h in (1, 3)])

  def test_greedy_rechecks_the_combined_set(self):
    """Heads 0 and 1 each gain 3 alone but only 1 together; head 2 gains 2 and combines well."""
    table = {(): 10, (0,): 13, (1,): 13, (2,): 12, (0, 1): 11, (0, 2): 15, (0, 1, 2): 13}

    def evaluate(select):
      return table[tuple(int(h) for h in np.nonzero(select[0])[0])]

    independent = search.search_heads(evaluate, (1, 3), [(0, 0), (0, 1), (0, 2)], total=20)
    self.assertEqual(independent.heads, {(0, 0), (0, 1), (0, 2)})
    self.assertEqual(independent.combined, 13)
    greedy = search.search_heads(evaluate, (1, 3), [(0, 0), (0, 1), (0, 2)], total=20, mode="greedy")
    self.assertEqual(greedy.heads, {(0, 0), (0, 2)})
    self.assertEqual(greedy.combined, 15)
    self.assertEqual([s["accepted"] for s in greedy.trace], [True, False, True])

  def test_candidates_and_arguments(self):
    self.assertEqual(search.reference_layers(32), tuple(range(2, 31)))
    self.assertLen(search.candidate_heads(30, 9), 27 * 9)
    with self.assertRaisesRegex(ValueError, r"layer indices \[30\]"):
      search.candidate_heads(30, 9, layers=[29, 30])
    with self.assertRaisesRegex(ValueError, "mode='best'"):
      search.search_heads(lambda s: 0, (1, 1), [(0, 0)], total=1, mode="best")


class JobHelpersTest(absltest.TestCase):

  def test_mcnemar_exact(self):
    from lacax.jobs import act as act_job  # pylint: disable=g-import-not-at-top

    base = np.array([True] * 5 + [False] * 10)
    self.assertAlmostEqual(act_job.mcnemar_p(base, np.zeros_like(base)), 2 / 32)  # 5 lost, 0 gained
    self.assertEqual(act_job.mcnemar_p(base, base), 1.0)


if __name__ == "__main__":
  absltest.main()
