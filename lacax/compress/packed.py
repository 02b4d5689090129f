"""Compressed parameters as the forward runs them: packed low-bit layers, fake-quantized layers, activation
quantization, and resident bytes.

Per-layer bit widths differ, while a stacked segment shares one type per projection; so layers are grouped into
segments of consecutive layers with the same (w_bits, a_bits), which `lacax.model.llama.run` scans one after
the other (`params["layers"]` a list of segments of the model-wide shapes; `cfg.layer_shapes` stays None).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.compress import calibrate, quant
from lacax.model.llama import ProjectedWeight, project
from lacax.model.quantized import PackedTable, PackedWeight, SparseWeight


@flax.struct.dataclass
class ActQuantWeight(ProjectedWeight):
  """A projection whose input is fake-quantized per token (`quant.fake_quant_tokens` over all of a token's
  input features) before it meets the weight `w` (dense or any `ProjectedWeight`)."""

  w: Any
  a_bits: int = flax.struct.field(pytree_node=False, default=8)
  ste_window: float | None = flax.struct.field(pytree_node=False, default=quant.DEFAULT_STE_WINDOW)

  @property
  def shape(self):
    return tuple(self.w.shape)

  def dense(self, dtype=jnp.float32):
    return self.w.dense(dtype) if isinstance(self.w, ProjectedWeight) else self.w.astype(dtype)

  def project(self, x, equation, preferred_element_type=None):
    lead = x.shape[:2]
    xq = quant.fake_quant_tokens(x.reshape(*lead, -1), self.a_bits, ste_window=self.ste_window).reshape(x.shape)
    return project(xq, self.w, equation, preferred_element_type)


def segment_bounds(keys: Sequence[Any]) -> list[tuple[int, int]]:
  """[(start, stop)] of the runs of equal consecutive keys."""
  bounds, start = [], 0
  for i in range(1, len(keys) + 1):
    if i == len(keys) or keys[i] != keys[start]:
      bounds.append((start, i))
      start = i
  return bounds


def compress_layers(layers: dict[str, Any], w_bits: Sequence[int | None], a_bits: Sequence[int | None], *,
                    storage: str, group_size: int | None = None, ste_window: float | None = None
                    ) -> dict[str, Any] | list[dict[str, Any]]:
  """Stacked dense layers -> what the forward runs: per layer, weights fake-quantized ("fake") or packed
  ("packed") at w_bits[l] (None: left dense) and inputs quantized at a_bits[l]; "sparse" packs like "packed"
  and then stores an 8-bit projection as a `SparseWeight` (its non-zero codes and a bit mask) where that takes
  fewer bytes. Returns one stacked dict when that needs no segments (fake storage, no activation bits), else a
  list of segments."""
  L = len(w_bits)
  if storage == "fake" and all(a is None for a in a_bits):
    out = dict(layers)
    for name in calibrate.PROJECTIONS:
      per_layer = [layers[name][l] if w_bits[l] is None else
                   quant.fake_quant_weight(layers[name][l:l + 1], calibrate.num_input_axes(name), w_bits[l],
                                           group_size, ste_window=ste_window)[0]
                   for l in range(L)]
      out[name] = jnp.stack(per_layer)
    return out
  segments = []
  for start, stop in segment_bounds(list(zip(w_bits, a_bits))):
    seg = jax.tree.map(lambda a: a[start:stop], layers)
    wb, ab = w_bits[start], a_bits[start]
    for name in calibrate.PROJECTIONS:
      w = seg[name]
      if wb is not None:
        n_in = calibrate.num_input_axes(name)
        if storage in ("packed", "sparse"):
          w = PackedWeight.quantize(w, n_in, wb, group_size)
          if storage == "sparse" and SparseWeight.supported(w):
            sparse = SparseWeight.from_packed(w)
            w = sparse if sparse.nbytes < w.nbytes else w
        else:
          w = quant.fake_quant_weight(w, n_in, wb, group_size, ste_window=ste_window)
      if ab is not None:
        w = ActQuantWeight(w=w, a_bits=ab, ste_window=ste_window)
      seg[name] = w
    segments.append(seg)
  return segments


def compress_head(params: dict[str, Any], tied: bool, bits: int, group_size: int = 32) -> dict[str, Any]:
  """`params` with the LM head packed as a `PackedTable` of `bits` (8, or 3-4 stored as 4) in groups of
  `group_size` entries of each row: the tied embedding itself when `tied` (it is then gathered dequantized),
  else `lm_head`. On CPU a decode step reads the codes in the low-bit kernel; at 4 bits SmolLM2's 113 MB
  float32 head becomes 14 MB of codes and 3.5 MB of float32 scales."""
  name = "embed" if tied else "lm_head"
  table = params[name]
  if isinstance(table, ProjectedWeight):
    raise ValueError(f"compress_head: params[{name!r}] is already a {type(table).__name__}")
  return {**params, name: PackedTable.quantize(table, bits, group_size)}


def param_bytes(params: Any) -> int:
  """Resident bytes of every array leaf of a parameter pytree (packed codes, scales and offsets included)."""
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params)))


def layer_param_bytes(params: Any) -> int:
  """Resident bytes of the decoder layers only."""
  return param_bytes(params["layers"])
