"""Subnet shapes: a static (layer mask, width) value, and the traced arrays that execute it.

A `SubnetShape` is hashable and static: it names one subnet (which layers run, which width of the grid). A
`SubnetSpace` holds what turns shapes into computation: the depth strategy (`strategy[L - d]`), the width
masks, and the grid the one-for-all model is trained on. `space.arrays(shape)` gives `SubnetArrays`, a pytree of
fixed-shape arrays (layer gates, head / FFN-channel masks, compensation biases, the router's shape encoding),
so every shape of the grid runs through one compiled function: only array values change between shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

from lacax.subnets.depth import DepthStrategy
from lacax.subnets.width import WidthMasks, kept_fraction


@dataclasses.dataclass(frozen=True)
class SubnetShape:
  """One subnet: `layer_mask[i]` = 1 when layer i runs; `width` one value of the trained width grid."""

  layer_mask: tuple[int, ...]
  width: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "layer_mask", tuple(int(bool(v)) for v in self.layer_mask))
    object.__setattr__(self, "width", float(self.width))

  @property
  def depth(self) -> int:
    return sum(self.layer_mask)

  def label(self) -> str:
    return f"d{self.depth}_w{self.width:.4g}"


@flax.struct.dataclass
class SubnetArrays:
  """A shape as arrays of fixed shape (traced under jit; shapes do not change between subnets).

  Attributes:
    layer_gate: [L] float32, 1 = the layer runs, 0 = skipped (the residual passes through).
    head_mask: [L, H] float32 query-head mask (a whole KV group at a time, see lacax.subnets.width).
    kv_mask: [L, KV] float32 key/value-head mask.
    ffn_mask: [L, F] float32 FFN-channel mask.
    attn_bias: [L, D] float32 added to the attention output (o_proj bias compensation).
    ffn_bias: [L, D] float32 added to the FFN output (down_proj bias compensation).
    encoding: [L + W] float32 the router input: layer mask ++ one-hot width.
  """

  layer_gate: jnp.ndarray
  head_mask: jnp.ndarray
  kv_mask: jnp.ndarray
  ffn_mask: jnp.ndarray
  attn_bias: jnp.ndarray
  ffn_bias: jnp.ndarray
  encoding: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class SubnetSpace:
  """The grid of subnets one model serves.

  Attributes:
    depth: the depth strategy (DP table or a baseline).
    width: the width masks (keyed by exact width).
    widths: the trained width grid, largest first (`width_choice`; reference [1, 7/8, 3/4, 5/8]).
    min_depth: the smallest trained depth (`min_num_layer`).
  """

  depth: DepthStrategy
  width: WidthMasks
  widths: tuple[float, ...]
  min_depth: int

  def __post_init__(self):
    object.__setattr__(self, "widths", tuple(float(w) for w in self.widths))
    for w in self.widths:
      self.width.check_width(w)
    if not self.depth.min_depth <= self.min_depth <= self.num_layers:
      raise ValueError(f"min_depth={self.min_depth} is out of range: the depth strategy covers depths "
                       f"{self.depth.min_depth}..{self.num_layers}")

  @property
  def num_layers(self) -> int:
    return self.depth.num_layers

  @property
  def depths(self) -> tuple[int, ...]:
    return tuple(range(self.num_layers, self.min_depth - 1, -1))

  def shape(self, depth: int, width: float) -> SubnetShape:
    """The subnet of `depth` layers at `width`; errors name the value and the trained range."""
    if not isinstance(depth, (int, np.integer)) or not self.min_depth <= depth <= self.num_layers:
      raise ValueError(f"depth={depth!r} is out of range: trained depths are {self.min_depth}..{self.num_layers}")
    w = self._grid_width(width)
    return SubnetShape(self.depth.mask(int(depth)), w)

  def _grid_width(self, width: float) -> float:
    for w in self.widths:
      if abs(float(width) - w) < 1e-9:
        return w
    raise ValueError(f"width={width!r} is not in the trained width grid {list(self.widths)}")

  def grid(self) -> list[SubnetShape]:
    """Every (depth, width) of the trained grid, largest first."""
    return [self.shape(d, w) for d in self.depths for w in self.widths]

  @property
  def largest(self) -> SubnetShape:
    return self.shape(self.num_layers, self.widths[0])

  @property
  def smallest(self) -> SubnetShape:
    return self.shape(self.min_depth, self.widths[-1])

  def encoding(self, shape: SubnetShape) -> np.ndarray:
    """[L + W] float32: the layer mask ++ one-hot of the width's index in the grid (the SMoL router input)."""
    one_hot = np.zeros(len(self.widths), np.float32)
    one_hot[self.widths.index(self._grid_width(shape.width))] = 1.0
    return np.concatenate([np.asarray(shape.layer_mask, np.float32), one_hot])

  def arrays(self, shape: SubnetShape, cfg) -> SubnetArrays:
    """The traced-array form of `shape` for `cfg`'s model."""
    if len(shape.layer_mask) != cfg.num_layers:
      raise ValueError(f"shape.layer_mask has {len(shape.layer_mask)} layers; the model has {cfg.num_layers}")
    group_mask, ffn_mask, attn_bias, ffn_bias = self.width.masks(self._grid_width(shape.width))
    head_mask = np.repeat(group_mask, cfg.group_size, axis=1)
    f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
    return SubnetArrays(layer_gate=f32(shape.layer_mask), head_mask=f32(head_mask), kv_mask=f32(group_mask),
                        ffn_mask=f32(ffn_mask), attn_bias=f32(attn_bias), ffn_bias=f32(ffn_bias),
                        encoding=f32(self.encoding(shape)))

  def kept_fraction(self, shape: SubnetShape, cfg) -> float:
    """Fraction of the decoder stack's attention + FFN parameters the subnet keeps."""
    group_mask, ffn_mask, _, _ = self.width.masks(self._grid_width(shape.width))
    return kept_fraction(group_mask, ffn_mask, cfg, shape.layer_mask)


def stack_arrays(arrays: Sequence[SubnetArrays]) -> SubnetArrays:
  """Stacks several shapes on a new leading axis (the sandwich of one training step)."""
  return SubnetArrays(*(jnp.stack([getattr(a, f.name) for a in arrays])
                        for f in dataclasses.fields(SubnetArrays)))
