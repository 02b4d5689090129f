"""Quantized weights through the forward's plug point (`lacax.model.llama.ProjectedWeight`).

`Int8Weight` stores a projection as int8 values with one float scale per output channel (symmetric, absmax /
127 over the contracted axes); `llama.project` dequantizes it into the product (XLA fuses the scale into the
dot's operand). It is the reference quantized-weight type of the plug point: packed int4, group-wise scales or
a Pallas int8 matmul (Edge-LLM) are further `ProjectedWeight` subclasses, and the one forward runs them all.

`PackedWeight` is the general low-bit form: int8, or 3/4-bit codes two per byte, or 2-bit codes four per byte,
with one scale per group of input features (per-channel = one group) and, for GGUF Q4_1, one offset per group.
GGUF Q8_0 / Q4_0 / Q4_1 tensors load straight into it (`lacax.weights.gguf.read_gguf(keep_quantized=True)`), and
`lacax.compress.packed` builds it from a compression policy.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import cpu_quant_matmul
from lacax.model.llama import ProjectedWeight

# Contracted (input) axes of every layer projection in the stacked layout of lacax.model.llama (axis 0 = layer).
LAYER_INPUT_AXES = {"wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2), "w_gate": (1,), "w_up": (1,),
                    "w_down": (1,)}


@flax.struct.dataclass
class Int8Weight(ProjectedWeight):
  """int8 values [...] and float32 scales (the values' shape with the input axes of size 1)."""

  values: jax.Array
  scales: jax.Array

  @classmethod
  def quantize(cls, w: jax.Array, input_axes: Sequence[int]) -> "Int8Weight":
    """Symmetric per-output-channel quantization: scale = max |w| over `input_axes` / 127."""
    wf = w.astype(jnp.float32)
    scales = jnp.max(jnp.abs(wf), axis=tuple(input_axes), keepdims=True) / 127.0
    scales = jnp.where(scales > 0, scales, 1.0)
    values = jnp.clip(jnp.round(wf / scales), -127, 127).astype(jnp.int8)
    return cls(values=values, scales=scales)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  def dense(self, dtype=jnp.float32) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scales).astype(dtype)

  def project(self, x: jax.Array, equation: str, preferred_element_type=None) -> jax.Array:
    return jnp.einsum(equation, x, self.dense(x.dtype), preferred_element_type=preferred_element_type)


def quantize_layers(params: Any, targets: Sequence[str] = tuple(LAYER_INPUT_AXES)) -> Any:
  """`params` with the layer projections `targets` replaced by `Int8Weight`s (every segment)."""
  unknown = sorted(set(targets) - set(LAYER_INPUT_AXES))
  if unknown:
    raise ValueError(f"quantize_layers targets {unknown}; expected a subset of {sorted(LAYER_INPUT_AXES)}")

  def segment(seg):
    return {name: Int8Weight.quantize(w, LAYER_INPUT_AXES[name]) if name in targets else w
            for name, w in seg.items()}

  layers = params["layers"]
  layers = [segment(s) for s in layers] if isinstance(layers, (list, tuple)) else segment(layers)
  return {**params, "layers": layers}


# --- packed low-bit weights (Edge-LLM; GGUF Q8_0 / Q4_0 / Q4_1 load into these) -----------------------------


def storage_bits(bits: int) -> int:
  """Bits one value occupies in a `PackedWeight`: 8 for 5..8-bit codes, 4 for 3..4 (two per byte), 2 for 2."""
  if bits not in (2, 3, 4, 5, 6, 7, 8):
    raise ValueError(f"bits={bits}; expected an integer in [2, 8]")
  return 8 if bits > 4 else (4 if bits > 2 else 2)


def _leaf_bytes(*leaves) -> int:
  """Resident bytes of the array leaves given (None entries skipped)."""
  return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in leaves if a is not None))


def _signed_int8(codes, mins, what: str):
  """8-bit codes as stored: int8, symmetric (a `mins` is refused by name)."""
  if mins is not None:
    raise ValueError(f"8-bit {what} codes are signed and symmetric; mins must be None")
  return codes.astype((np if isinstance(codes, np.ndarray) else jnp).int8)


def pack_codes(codes, bits: int):
  """Unsigned codes [..., K, N] (each < 2**storage_bits) -> uint8 [..., K / per_byte, N], code k of a byte at
  bit offset storage_bits * (k % per_byte). Works on numpy and jax arrays (integer ops only)."""
  sb = storage_bits(bits)
  per_byte = 8 // sb
  xp = np if isinstance(codes, np.ndarray) else jnp
  *lead, k, n = codes.shape
  if k % per_byte:
    raise ValueError(f"{k} input features cannot be packed {per_byte} per byte")
  c = codes.astype(xp.uint8).reshape(*lead, k // per_byte, per_byte, n)
  shifts = (xp.arange(per_byte, dtype=xp.uint8) * sb).reshape(per_byte, 1)
  return xp.bitwise_or.reduce(c << shifts, axis=-2) if xp is np else jnp.sum(
      (c << shifts).astype(jnp.uint32), axis=-2).astype(jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of `pack_codes`: uint8 [..., K / per_byte, N] -> uint8 codes [..., K, N]."""
  sb = storage_bits(bits)
  per_byte = 8 // sb
  *lead, kb, n = packed.shape
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * sb).reshape(per_byte, 1)
  codes = (packed[..., :, None, :] >> shifts) & jnp.uint8((1 << sb) - 1)
  return codes.reshape(*lead, kb * per_byte, n)


@flax.struct.dataclass
class PackedWeight(ProjectedWeight):
  """A projection stored as low-bit integer codes with one scale (and optionally one offset) per group of
  `group_size` consecutive input features, for each output feature.

  The weight is viewed as a matrix [K, N] per layer (K = the flattened input axes, which every layer projection
  of lacax.model.llama has first; N = the flattened output axes). Leaves (the layer axis first when stacked):

    data:   int8 [..., K, N] (8-bit codes, signed), or uint8 [..., K / p, N] with p = 8 / storage_bits codes
            per byte (`pack_codes`; 3/4-bit codes take 4 bits, 2-bit codes 2 bits)
    scales: [..., K / group_size, N] (float16 for GGUF blocks, float32 for lacax's own quantizer)
    mins:   None (symmetric: w = scale * (code - offset), offset 2**(storage_bits - 1) for packed codes, 0 for
            int8), or [..., K / group_size, N] (affine, Q4_1: w = scale * code + min)
    layer:  None, or an int32 scalar: the leaves are stacked on a leading layer axis and the weight is that
            layer of them (`at_layer`: the forward's scan reads packed layers in place, not as copied slices)

  `dense` computes exactly what `gguf.quants.dequantize` computes (float32 products of the float16 block
  scales), and `project` multiplies by it: the dequantization is fused into the matmul's operand by XLA, or, on
  XLA:CPU for decode-sized inputs, a custom call reads the packed codes directly (`lacax.model.cpu_quant_matmul`).
  """

  data: jax.Array
  scales: jax.Array
  mins: jax.Array | None = None
  layer: jax.Array | None = None
  bits: int = flax.struct.field(pytree_node=False, default=8)
  group_size: int = flax.struct.field(pytree_node=False, default=32)
  in_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  out_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  reads_layers_in_place = True

  @property
  def shape(self) -> tuple[int, ...]:
    lead = tuple(self.data.shape[:-2])[0 if self.layer is None else 1:]
    return lead + tuple(self.in_shape) + tuple(self.out_shape)

  def at_layer(self, index: jax.Array) -> "PackedWeight":
    """Layer `index` of this weight stacked on one leading layer axis, reading the stacked leaves in place."""
    if self.layer is not None or self.data.ndim != 3:
      raise ValueError(f"at_layer needs leaves [layers, K', N] and no layer yet; data is {self.data.shape}, "
                       f"layer {self.layer}")
    return self.replace(layer=jnp.asarray(index, jnp.int32))

  def _one_layer(self) -> "PackedWeight":
    """The weight with `layer` applied: leaves sliced (XLA fuses the slice into what reads it)."""
    if self.layer is None:
      return self
    pick = lambda a: None if a is None else jax.lax.dynamic_index_in_dim(a, self.layer, 0, keepdims=False)
    return self.replace(data=pick(self.data), scales=pick(self.scales), mins=pick(self.mins), layer=None)

  @property
  def nbytes(self) -> int:
    """Resident bytes of the leaves (codes + scales + offsets)."""
    return _leaf_bytes(self.data, self.scales, self.mins)

  def codes(self) -> jax.Array:
    """Integer codes [..., K, N]: signed (symmetric) values, or unsigned ones for the affine form."""
    if self.layer is not None:
      return self._one_layer().codes()
    if storage_bits(self.bits) == 8:
      return self.data.astype(jnp.int32)
    codes = unpack_codes(self.data, self.bits).astype(jnp.int32)
    return codes if self.mins is not None else codes - (1 << (storage_bits(self.bits) - 1))

  def dense(self, dtype=jnp.float32) -> jax.Array:
    if self.layer is not None:
      return self._one_layer().dense(dtype)
    codes = self.codes()
    *lead, k, n = codes.shape
    g = self.group_size
    q = codes.reshape(*lead, k // g, g, n).astype(jnp.float32)
    scale = self.scales.astype(jnp.float32)[..., :, None, :]
    w = scale * q
    if self.mins is not None:
      w = w + self.mins.astype(jnp.float32)[..., :, None, :]
    return w.reshape(tuple(lead) + tuple(self.in_shape) + tuple(self.out_shape)).astype(dtype)

  def project(self, x: jax.Array, equation: str, preferred_element_type=None) -> jax.Array:
    """The product with the dense weight: on XLA:CPU for decode-sized inputs the low-bit matmul kernel
    (`lacax.model.cpu_quant_matmul`, which reads the packed codes once), else `_xla_project`."""
    if cpu_quant_matmul.supports(self, x, equation) and cpu_quant_matmul.available():
      reference = lambda x, w: w._xla_project(x, equation, preferred_element_type)  # pylint: disable=protected-access
      return cpu_quant_matmul.project(self, x, equation, reference, preferred_element_type)
    return self._xla_project(x, equation, preferred_element_type)

  def _xla_project(self, x: jax.Array, equation: str, preferred_element_type=None) -> jax.Array:
    """The reference product: the dequantized weight into XLA's einsum (XLA fuses what it can)."""
    return jnp.einsum(equation, x, self.dense(x.dtype), preferred_element_type=preferred_element_type)

  @classmethod
  def from_codes(cls, codes, scales, mins=None, *, bits: int, group_size: int, in_shape, out_shape
                 ) -> "PackedWeight":
    """From codes [..., K, N] (signed for the symmetric form, unsigned 0..2**bits-1 with `mins`)."""
    sb = storage_bits(bits)
    if sb == 8:
      data = _signed_int8(codes, mins, "PackedWeight")
    else:
      unsigned = codes if mins is not None else codes + (1 << (sb - 1))
      data = pack_codes(unsigned, bits)
    return cls(data=data, scales=scales, mins=mins, bits=bits, group_size=group_size,
               in_shape=tuple(int(d) for d in in_shape), out_shape=tuple(int(d) for d in out_shape))

  @classmethod
  def quantize(cls, w: jax.Array, num_input_axes: int, bits: int, group_size: int | None = None,
               num_lead_axes: int = 1) -> "PackedWeight":
    """Symmetric round-to-nearest quantization of a dense weight [lead..., in..., out...]: scale = max |w| over
    each group / (2**(bits-1) - 1), codes in [-(2**(bits-1) - 1), 2**(bits-1) - 1]; group_size None = one
    group per output channel (per-channel)."""
    from lacax.compress import quant  # pylint: disable=g-import-not-at-top

    lead = w.shape[:num_lead_axes]
    in_shape = w.shape[num_lead_axes:num_lead_axes + num_input_axes]
    out_shape = w.shape[num_lead_axes + num_input_axes:]
    k, n = int(np.prod(in_shape)), int(np.prod(out_shape))
    mat = jnp.asarray(w, jnp.float32).reshape(*lead, k, n)
    g = k if group_size is None else int(group_size)
    codes, scales = quant.quantize_codes(mat, bits, g)
    return cls.from_codes(codes, scales, bits=bits, group_size=g, in_shape=in_shape, out_shape=out_shape)


# --- packed output-major tables: the embedding and LM head [vocab, hidden] ----------------------------------


def pack_row_nibbles(codes):
  """Unsigned 4-bit codes [..., K] (K a multiple of 32) -> uint8 [..., K / 2] in GGUF's block order: within
  each 32 codes, byte j holds code j in its low nibble and code j + 16 in its high one. numpy or jax."""
  xp = np if isinstance(codes, np.ndarray) else jnp
  *lead, k = codes.shape
  if k % 32:
    raise ValueError(f"4-bit table rows pack in blocks of 32 codes; a row has {k}")
  c = codes.astype(xp.uint8).reshape(*lead, k // 32, 2, 16)
  return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*lead, k // 2)


def unpack_row_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_row_nibbles`: uint8 [..., K / 2] -> uint8 codes [..., K]."""
  *lead, kb = packed.shape
  b = packed.reshape(*lead, kb // 16, 1, 16)
  return jnp.concatenate([b & jnp.uint8(0x0F), b >> jnp.uint8(4)], axis=-2).reshape(*lead, kb * 2)


@flax.struct.dataclass
class PackedTable(ProjectedWeight):
  """An output-major table [N, K] (the token embedding / LM head [vocab, hidden]) stored as codes along K with
  one scale (and optionally one offset) per group of `group_size` consecutive entries of a row: a tied
  embedding that is both gathered (`lookup`, which dequantizes only the rows it reads) and multiplied
  (`project` by "btd,vd->btv", the LM head).

    data:   int8 [N, K] (8-bit codes, signed), or uint8 [N, K / 2] (3/4-bit codes, GGUF block order:
            `pack_row_nibbles`)
    scales: [N, K / group_size] float16 (GGUF Q8_0 / Q4_0 / Q4_1 blocks) or float32 (lacax's quantizer)
    mins:   None (symmetric: w = scale * (code - offset), offset 8 for 4-bit codes, 0 for int8) or like scales
            (affine, Q4_1: w = scale * code + min)

  This is the layout of GGUF's own `token_embd` blocks, so `load_model(keep_quantized=True)` keeps the file's
  codes. On XLA:CPU a decode step's head product runs the low-bit kernel (`cpu_quant_matmul.project_rows`;
  groups of a multiple of 16 int8 or 32 4-bit codes); elsewhere XLA dequantizes the table into the einsum.
  """

  data: jax.Array
  scales: jax.Array
  mins: jax.Array | None = None
  bits: int = flax.struct.field(pytree_node=False, default=8)
  group_size: int = flax.struct.field(pytree_node=False, default=32)

  @property
  def shape(self) -> tuple[int, ...]:
    return (int(self.data.shape[0]), int(self.scales.shape[1]) * self.group_size)

  @property
  def nbytes(self) -> int:
    return _leaf_bytes(self.data, self.scales, self.mins)

  def _dequantize(self, data, scales, mins, dtype):
    """Rows of codes [..., K'] with their scales [..., K / G] -> [..., K] in dtype."""
    if storage_bits(self.bits) == 8:
      q = data.astype(jnp.float32)
    else:
      q = unpack_row_nibbles(data).astype(jnp.float32) - (0.0 if mins is not None else 8.0)
    *lead, k = q.shape
    w = q.reshape(*lead, k // self.group_size, self.group_size) * scales.astype(jnp.float32)[..., None]
    if mins is not None:
      w = w + mins.astype(jnp.float32)[..., None]
    return w.reshape(*lead, k).astype(dtype)

  def dense(self, dtype=jnp.float32) -> jax.Array:
    return self._dequantize(self.data, self.scales, self.mins, dtype)

  def lookup(self, tokens: jax.Array, dtype) -> jax.Array:
    """Rows `tokens` of the table, dequantized: [..., K] in dtype (reads only those rows)."""
    pick = lambda a: None if a is None else a[tokens]  # noqa: E731
    return self._dequantize(pick(self.data), pick(self.scales), pick(self.mins), dtype)

  def project(self, x: jax.Array, equation: str, preferred_element_type=None) -> jax.Array:
    sb = storage_bits(self.bits)
    reference = lambda x, data, scales, mins: jnp.einsum(  # noqa: E731
        equation, x, self.replace(data=data, scales=scales, mins=mins).dense(x.dtype),
        preferred_element_type=preferred_element_type)
    if (sb in (8, 4) and cpu_quant_matmul.supports_rows(self.shape, x, equation, storage_bits=sb,
                                                        group_size=self.group_size)
        and cpu_quant_matmul.available()):
      return cpu_quant_matmul.project_rows(x, self.data, self.scales, self.mins, reference, storage_bits=sb,
                                           group_size=self.group_size,
                                           preferred_element_type=preferred_element_type)
    return reference(x, self.data, self.scales, self.mins)

  @classmethod
  def from_codes(cls, codes, scales, mins=None, *, bits: int, group_size: int) -> "PackedTable":
    """From codes [N, K]: signed for the symmetric form (|code| < 2**(bits-1)), unsigned 0..15 with `mins`."""
    sb = storage_bits(bits)
    if sb not in (8, 4):
      raise ValueError(f"PackedTable bits={bits}; expected 3..8 (2-bit tables are not supported)")
    if sb == 8:
      data = _signed_int8(codes, mins, "PackedTable")
    else:
      data = pack_row_nibbles(codes if mins is not None else codes + 8)
    return cls(data=data, scales=scales, mins=mins, bits=bits, group_size=int(group_size))

  @classmethod
  def quantize(cls, table: jax.Array, bits: int, group_size: int = 32) -> "PackedTable":
    """Symmetric round-to-nearest codes of a table [N, K], one scale per group of `group_size` entries of a
    row (max |w| / (2**(bits-1) - 1)): what `PackedWeight.quantize` does, along the table's rows."""
    from lacax.compress import quant  # pylint: disable=g-import-not-at-top

    n, k = table.shape
    if group_size <= 0 or k % group_size:
      raise ValueError(f"PackedTable group_size={group_size} must divide the row length {k}")
    codes, scales = quant.quantize_codes(jnp.asarray(table, jnp.float32).T, bits, group_size)
    return cls.from_codes(codes.T, scales.T, bits=bits, group_size=group_size)


# --- sparse int8 codes (Edge-LLM's pruned + 8-bit layers) ---------------------------------------------------

SPARSE_TILE = 64  # output columns per mask word


@flax.struct.dataclass
class SparseWeight(ProjectedWeight):
  """A stacked 8-bit projection [L, K, N] that stores only its non-zero codes: resident bytes fall with the
  sparsity (a pruned weight costs one mask bit, a kept one its byte), and the decode product reads only them.

  Per layer, the N output columns are cut into tiles of `SPARSE_TILE`; for each tile and input row k a 64-bit
  mask says which codes of that row are kept, and the kept codes follow one another, row by row, in column
  order, in one flat `values` buffer for all layers. Leaves:

    mask:    uint8 [L, N / 64, K, 8] (bit c of byte j: column 8 j + c of the tile)
    values:  int8 [kept codes of all layers + max_segment] (the tail is padding, so that the XLA path can
             slice `max_segment` codes from any segment start)
    offsets: int32 [L, N / 64 + 1]: tile t of layer l holds values[offsets[l, t], offsets[l, t + 1])
    scales:  [L, K / group_size, N] as `PackedWeight`'s (symmetric: w = scale * code)
    layer:   None, or the int32 layer the weight is (`at_layer`: read in place, as `PackedWeight`)

  The byte model of `lacax.compress.policy` (kept values + one mask bit per weight + scales) is what this
  holds, plus 4 bytes per tile of offsets. On XLA:CPU a decode step multiplies with the `lacax_sparse_matmul`
  kernel (AVX-512 VBMI2 expand-loads where the CPU has them); elsewhere the codes are scattered back into a
  dense layer for XLA's einsum. Built from an 8-bit `PackedWeight` by `from_packed` (host side).
  """

  mask: jax.Array
  values: jax.Array
  offsets: jax.Array
  scales: jax.Array
  layer: jax.Array | None = None
  group_size: int = flax.struct.field(pytree_node=False, default=32)
  in_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  out_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  max_segment: int = flax.struct.field(pytree_node=False, default=0)

  reads_layers_in_place = True
  bits = 8

  @property
  def shape(self) -> tuple[int, ...]:
    lead = () if self.layer is not None else (int(self.mask.shape[0]),)
    return lead + tuple(self.in_shape) + tuple(self.out_shape)

  @property
  def nbytes(self) -> int:
    return _leaf_bytes(self.mask, self.values, self.offsets, self.scales)

  def at_layer(self, index: jax.Array) -> "SparseWeight":
    if self.layer is not None:
      raise ValueError(f"at_layer on a SparseWeight that is already layer {self.layer}")
    return self.replace(layer=jnp.asarray(index, jnp.int32))

  @classmethod
  def supported(cls, w: "PackedWeight") -> bool:
    """Whether `from_packed` takes `w`: stacked [L, K, N] 8-bit codes with N a multiple of SPARSE_TILE."""
    n = int(np.prod(w.out_shape, dtype=np.int64))
    return storage_bits(w.bits) == 8 and w.mins is None and w.layer is None and w.data.ndim == 3 and (
        n % SPARSE_TILE == 0)

  @classmethod
  def from_packed(cls, w: "PackedWeight") -> "SparseWeight":
    """The non-zero codes of a stacked 8-bit `PackedWeight` (numpy on the host; values are unchanged)."""
    if not cls.supported(w):
      raise ValueError(f"SparseWeight needs stacked 8-bit symmetric codes [L, K, N] with N a multiple of "
                       f"{SPARSE_TILE}; got bits={w.bits}, data {tuple(w.data.shape)}, affine={w.mins is not None}")
    codes = np.asarray(w.data, np.int8)
    L, K, N = codes.shape
    T = N // SPARSE_TILE
    tiles = codes.reshape(L, K, T, SPARSE_TILE).transpose(0, 2, 1, 3)  # [L, T, K, 64]
    kept = tiles != 0
    counts = kept.reshape(L * T, -1).sum(axis=1)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if starts[-1] >= 2 ** 31:
      raise ValueError(f"SparseWeight holds {starts[-1]} codes; at most 2**31 - 1 are addressable")
    max_segment = int(counts.max()) if counts.size else 0
    values = np.concatenate([tiles[kept], np.zeros(max_segment, np.int8)])
    offsets = np.empty((L, T + 1), np.int32)
    offsets[:, :T] = starts[:-1].reshape(L, T)
    offsets[:, T] = starts[1:].reshape(L, T)[:, -1]
    mask = np.packbits(kept, axis=-1, bitorder="little")  # [L, T, K, 8]
    return cls(mask=jnp.asarray(mask), values=jnp.asarray(values), offsets=jnp.asarray(offsets),
               scales=jnp.asarray(w.scales), group_size=w.group_size, in_shape=tuple(w.in_shape),
               out_shape=tuple(w.out_shape), max_segment=max(max_segment, 1))

  def _layer_codes(self, layer) -> jax.Array:
    """int32 codes [K, N] of one layer (traced index), scattered back from the kept ones."""
    _, T, K, _ = self.mask.shape
    bits = jnp.unpackbits(self.mask[layer], axis=-1, bitorder="little").reshape(T, K * SPARSE_TILE)
    index = jnp.maximum(jnp.cumsum(bits.astype(jnp.int32), axis=1) - 1, 0)
    segments = jax.vmap(lambda s: jax.lax.dynamic_slice(self.values, (s,), (self.max_segment,)))(
        self.offsets[layer, :T])
    codes = jnp.where(bits > 0, jnp.take_along_axis(segments, index, axis=1).astype(jnp.int32), 0)
    return codes.reshape(T, K, SPARSE_TILE).transpose(1, 0, 2).reshape(K, T * SPARSE_TILE)

  def _layer_dense(self, layer, dtype) -> jax.Array:
    codes = self._layer_codes(layer)
    k, n = codes.shape
    g = self.group_size
    scales = jax.lax.dynamic_index_in_dim(self.scales, layer, 0, keepdims=False).astype(jnp.float32)
    w = codes.reshape(k // g, g, n).astype(jnp.float32) * scales[:, None, :]
    return w.reshape(tuple(self.in_shape) + tuple(self.out_shape)).astype(dtype)

  def dense(self, dtype=jnp.float32) -> jax.Array:
    if self.layer is not None:
      return self._layer_dense(self.layer, dtype)
    return jnp.stack([self._layer_dense(l, dtype) for l in range(int(self.mask.shape[0]))])

  def project(self, x: jax.Array, equation: str, preferred_element_type=None) -> jax.Array:
    w = self if self.layer is not None else self.at_layer(0) if self.mask.shape[0] == 1 else None
    if w is None:
      raise ValueError("SparseWeight.project needs one layer: call at_layer (the forward's scan does)")

    def reference(x, mask, values, offsets, scales, layer):
      one = w.replace(mask=mask, values=values, offsets=offsets, scales=scales, layer=layer)
      return jnp.einsum(equation, x, one.dense(x.dtype), preferred_element_type=preferred_element_type)

    args = (x, w.mask, w.values, w.offsets, w.scales, w.layer)
    if cpu_quant_matmul.supports_sparse(w, x, equation) and cpu_quant_matmul.available():
      return cpu_quant_matmul.project_sparse(w, x, reference, preferred_element_type)
    return reference(*args)
