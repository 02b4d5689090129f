"""Tokenizers for lacax models: a thin wrapper over `tokenizers.Tokenizer` plus chat templates.

Two sources:

* a Hugging Face tokenizer directory (`tokenizer.json`, with `tokenizer_config.json`, `special_tokens_map.json`,
  `generation_config.json` and `chat_template.jinja` when present): `Tokenizer.from_hf_dir`;
* a GGUF file with a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`): `Tokenizer.from_gguf` rebuilds
  the `tokenizers` pipeline from the metadata the way llama.cpp tokenizes.

`encode` never relies on a post-processor: it tokenizes without special tokens and prepends BOS itself when
`add_bos` (default: the tokenizer's own `add_bos_token` setting), so both sources behave alike.

Chat templates are rendered with the same sandboxed jinja2 environment as `transformers`
(`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`, `raise_exception`, a `tojson` that does not
escape HTML, `strftime_now`, loop controls and a pass-through `{% generation %}` block).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from lacax import io
from lacax.errors import DataError

# Tokens that end an assistant turn in common chat formats; those present in a vocabulary join `stop_ids`.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>",
                       "</s>", "<|eom_id|>")

# llama.cpp token types (`tokenizer.ggml.token_type`).
_CONTROL, _USER_DEFINED = 3, 4

# GPT-2's split (what `pre_tokenizers.ByteLevel(use_regex=True)` applies).
_GPT2_SPLIT = None
# llama.cpp splits every number character off first, then applies GPT-2's regex (STARCODER/REFACT/COMMAND_R/
# SMOLLM/CODESHELL/EXAONE/MINERVA in llama-vocab.cpp); this is also what SmolLM's tokenizer.json does with
# `Digits(individual_digits=True)`.
_DIGITS_THEN_GPT2 = r"\p{N}"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> (split regex, ignore_merges), following llama.cpp's llama-vocab.cpp.
_GGUF_PRE_TOKENIZERS: dict[str, tuple[str | None, bool]] = {
    **{name: (_GPT2_SPLIT, False) for name in ("default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais")},
    **{name: (_DIGITS_THEN_GPT2, False)
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{name: (_LLAMA3_SPLIT, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{name: (_QWEN2_SPLIT, False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
}


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, (chr(c) for c in chars)))


@functools.cache
def _jinja_environment():
  import jinja2  # pylint: disable=g-import-not-at-top
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own `tojson` HTML-escapes; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
  return _jinja_environment().from_string(template)


class Tokenizer:
  """Text <-> token ids, special token ids and the chat template of one model.

  Attributes:
    backend: the wrapped `tokenizers.Tokenizer`.
    bos_id: beginning-of-sequence id, or None.
    eos_id: end-of-sequence id, or None.
    stop_ids: ids that end generation: `eos_id`, the `generation_config.json` / GGUF end-of-turn ids and the common
      end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...) present in the vocabulary.
    add_bos_token: whether `encode` prepends BOS by default.
    chat_template: the jinja chat template, or None.
    special_tokens: {"bos_token": "<s>", "eos_token": ..., ...}: the strings templates see.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None = None, eos_id: int | None = None,
               extra_stop_ids: Iterable[int] = (), add_bos_token: bool = False, chat_template: str | None = None,
               special_tokens: Mapping[str, str | None] | None = None):
    self.backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.add_bos_token = bool(add_bos_token)
    self.chat_template = chat_template or None
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    for key, token_id in (("bos_token", bos_id), ("eos_token", eos_id)):
      if token_id is not None and key not in self.special_tokens:
        self.special_tokens[key] = backend.id_to_token(token_id)
    stops = [eos_id, *extra_stop_ids, *(backend.token_to_id(t) for t in _END_OF_TURN_TOKENS)]
    self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in stops if i is not None))

  def save_hf_dir(self, path: str) -> None:
    """Writes this tokenizer as a Hugging Face tokenizer directory that `from_hf_dir` restores with the same ids,
    bos / eos / stop ids, `add_bos_token`, special tokens and chat template: `tokenizer.json` (the backend),
    `tokenizer_config.json` (special tokens, `add_bos_token`, `chat_template`) and `generation_config.json`
    (`bos_token_id`, the stop ids as `eos_token_id`)."""
    os.makedirs(path, exist_ok=True)
    self.backend.save(os.path.join(path, "tokenizer.json"))
    config = {**self.special_tokens, "add_bos_token": self.add_bos_token}
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    io.write_json(os.path.join(path, "tokenizer_config.json"), config)
    generation = {"eos_token_id": list(self.stop_ids)}
    if self.bos_id is not None:
      generation["bos_token_id"] = self.bos_id
    io.write_json(os.path.join(path, "generation_config.json"), generation)

  # --- constructors -------------------------------------------------------------------------------------------

  @classmethod
  def from_hf_dir(cls, path: str) -> "Tokenizer":
    """Loads a Hugging Face tokenizer directory.

    Reads `tokenizer.json` (required), and when present `tokenizer_config.json` (bos/eos/unk/pad tokens,
    `add_bos_token`, `chat_template`), `chat_template.jinja` / `chat_template.json`, `special_tokens_map.json` and
    `generation_config.json` (`eos_token_id`, a list of stop ids for Llama 3). Without an explicit `add_bos_token`,
    it is inferred from the tokenizer's post-processor (does encoding "" with special tokens give [BOS]?).

    Raises:
      FileNotFoundError: no `tokenizer.json` in `path`.
    """
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
      raise FileNotFoundError(f"no tokenizer.json in tokenizer directory {path!r}")
    io.read_json(tokenizer_file, what="tokenizer.json")  # invalid text / JSON: an error naming the file
    try:
      backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception)
      raise DataError(tokenizer_file, f"not a tokenizer the tokenizers library can load ({e})") from None
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
    generation = _read_json(os.path.join(path, "generation_config.json"))

    special_tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
      token = _token_content(config.get(key)) or _token_content(special_map.get(key))
      if token is not None:
        special_tokens[key] = token

    def token_id(key: str) -> int | None:
      token = special_tokens.get(key)
      return backend.token_to_id(token) if token is not None else None

    bos_id = token_id("bos_token")
    if bos_id is None and isinstance(generation.get("bos_token_id"), int):
      bos_id = generation["bos_token_id"]
    gen_eos = generation.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    eos_id = token_id("eos_token")
    if eos_id is None and gen_eos:
      eos_id = gen_eos[0]

    add_bos = config.get("add_bos_token")
    if add_bos is None:
      ids = backend.encode("", add_special_tokens=True).ids
      add_bos = bos_id is not None and bool(ids) and ids[0] == bos_id
    return cls(backend, bos_id=bos_id, eos_id=eos_id, extra_stop_ids=gen_eos, add_bos_token=add_bos,
               chat_template=_hf_chat_template(path, config), special_tokens=special_tokens)

  @classmethod
  def from_gguf(cls, path: str) -> "Tokenizer":
    """Builds the tokenizer a GGUF file describes (byte-level BPE, `tokenizer.ggml.model == "gpt2"`).

    The vocabulary (`tokenizer.ggml.tokens`, ids = positions) and `tokenizer.ggml.merges` feed a
    `tokenizers.models.BPE`; the pre-tokenizer follows llama.cpp for `tokenizer.ggml.pre` (e.g. "smollm": split
    every digit off, then GPT-2's byte-level regex); control tokens (token_type 3) become special added tokens and
    user-defined ones (token_type 4) plain added tokens, so they are matched whole in text.

    Raises:
      ValueError: the file's `tokenizer.ggml.model` is not "gpt2" (the message names it), or it has no vocabulary.
    """
    from lacax.weights.gguf import read_gguf_metadata  # pylint: disable=g-import-not-at-top

    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' (byte-level BPE). "
                       "Load the model's Hugging Face tokenizer directory with Tokenizer.from_hf_dir instead")
    if "tokenizer.ggml.tokens" not in meta:
      raise ValueError(f"GGUF file {path!r} has no tokenizer.ggml.tokens")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    pre = meta.get("tokenizer.ggml.pre", "default")
    backend = _byte_level_bpe(tokens, list(meta.get("tokenizer.ggml.merges") or []), token_types, pre)

    def meta_id(key: str) -> int | None:
      value = meta.get(f"tokenizer.ggml.{key}")
      return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos_id, eos_id = meta_id("bos_token_id"), meta_id("eos_token_id")
    special_tokens = {key: tokens[i] for key, i in (("bos_token", bos_id), ("eos_token", eos_id),
                                                    ("unk_token", meta_id("unknown_token_id")),
                                                    ("pad_token", meta_id("padding_token_id"))) if i is not None}
    extra_stops = [i for i in (meta_id("eot_token_id"), meta_id("eom_token_id")) if i is not None]
    return cls(backend, bos_id=bos_id, eos_id=eos_id, extra_stop_ids=extra_stops,
               add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               chat_template=meta.get("tokenizer.chat_template"), special_tokens=special_tokens)

  # --- text <-> ids -------------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; special-token strings in it (e.g. "<|im_start|>") map to their ids.

    Args:
      text: the text.
      add_bos: prepend BOS; None follows `add_bos_token`.
    """
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if (self.add_bos_token if add_bos is None else add_bos):
      if self.bos_id is None:
        raise ValueError("add_bos=True but this tokenizer has no BOS token")
      ids = [self.bos_id, *ids]
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids` (numpy/jax integer arrays are accepted)."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.backend.id_to_token(int(token_id))

  # --- chat ---------------------------------------------------------------------------------------------------

  @property
  def has_chat_template(self) -> bool:
    return self.chat_template is not None

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                          **kwargs: Any) -> str:
    """Renders `messages` ([{"role": "user", "content": "hi"}, ...]) with the chat template.

    The template also sees `add_generation_prompt`, the special-token strings (`bos_token`, `eos_token`, ...) and
    `kwargs` (e.g. `tools=`, `documents=`), as in `transformers`' `apply_chat_template(..., tokenize=False)`.

    Raises:
      ValueError: the tokenizer has no chat template.
      jinja2.TemplateError: the template rejected the conversation (`raise_exception`).
    """
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template (no tokenizer.chat_template / chat_template in its "
                       "tokenizer_config.json)")
    context = {**self.special_tokens, **kwargs}
    return _compile_template(self.chat_template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **context)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"stop_ids={self.stop_ids}, add_bos_token={self.add_bos_token}, "
            f"has_chat_template={self.has_chat_template})")


def prompt_encoder(tokenizer: Tokenizer, chat: bool):
  """Text -> the ids fed to the model: the raw prompt (with the tokenizer's BOS rule), or wrapped as one user
  turn of the chat template (`chat=True`; the template's own BOS text is kept, no second BOS is added)."""
  if not chat:
    return tokenizer.encode
  if not tokenizer.has_chat_template:
    raise ValueError("chat=True but the model's tokenizer has no chat template; set chat=False")

  def encode(text: str) -> list[int]:
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(wrapped, add_bos=False)

  return encode


def load_tokenizer(path: str) -> Tokenizer:
  """A `Tokenizer` from a Hugging Face tokenizer/checkpoint directory or a `.gguf` file.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is a file that is not GGUF.
  """
  if os.path.isdir(path):
    return Tokenizer.from_hf_dir(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"GGUF":
    return Tokenizer.from_gguf(path)
  raise ValueError(f"{path!r} is neither a directory with tokenizer.json nor a GGUF file (magic {magic!r})")


# --- helpers --------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  value = io.read_json(path)
  if not isinstance(value, dict):
    raise DataError(path, f"expected a JSON object, got {type(value).__name__}")
  return value


def _token_content(token: Any) -> str | None:
  """A special token as written in HF configs: a string or an AddedToken dict {"content": ...}."""
  if isinstance(token, Mapping):
    token = token.get("content")
  return token if isinstance(token, str) else None


def _hf_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
  """The default chat template: chat_template.jinja, chat_template.json, or tokenizer_config.json's field."""
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(jinja_file):
    return io.read_text(jinja_file)
  template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template") or config.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    template = named.get("default") or next(iter(named.values()), None)
  return template if isinstance(template, str) else None


def _byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str) -> tokenizers.Tokenizer:
  """The `tokenizers` pipeline for a llama.cpp "gpt2" vocabulary (see `Tokenizer.from_gguf`)."""
  spell = bytes_to_unicode()
  alphabet = set(spell.values())
  # Byte-level vocabularies spell every token in GPT-2's byte alphabet; a token written in raw text (some
  # user-defined tokens) is respelled so BPE can reach it.
  vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
           for i, t in enumerate(tokens)}
  pairs = []
  for merge in merges:
    left, sep, right = merge.partition(" ")
    if not sep:
      raise ValueError(f"GGUF tokenizer.ggml.merges entry {merge!r} is not two tokens separated by a space")
    pairs.append((left, right))

  if pre not in _GGUF_PRE_TOKENIZERS:
    warnings.warn(f"GGUF tokenizer.ggml.pre={pre!r} is not known to lacax; using GPT-2's byte-level split, which "
                  f"may tokenize differently from llama.cpp. Known: {sorted(_GGUF_PRE_TOKENIZERS)}", stacklevel=3)
  split, ignore_merges = _GGUF_PRE_TOKENIZERS.get(pre, (_GPT2_SPLIT, False))
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                            end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                                            ignore_merges=ignore_merges))
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif split == _DIGITS_THEN_GPT2:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()

  # Control tokens (<|im_start|>, <|endoftext|>, ...) must be matched whole in text and skipped when decoding with
  # skip_special_tokens. A "control" token outside the byte alphabet is a llama.cpp mislabel and is left alone.
  types = token_types or [1] * len(tokens)
  control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
             if kind == _CONTROL and set(t) <= alphabet]
  user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
          if kind == _USER_DEFINED and t in vocab]
  if control:
    backend.add_special_tokens(control)
  if user:
    backend.add_tokens(user)
  return backend
