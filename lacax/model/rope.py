"""Rotary position embeddings in Hugging Face's rotate-half convention.

HF checkpoints store q/k projections for rotate-half RoPE, so they load without any permutation (GGUF files,
whose converter permutes rows for interleaved RoPE, are un-permuted by the GGUF loader).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lacax.model.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """[head_dim // 2] float32 inverse frequencies, with Llama-3 or linear scaling applied."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling.kind == "linear":
    return (inv_freq / scaling.factor).astype(np.float32)
  # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
  low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_table(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(cos, sin), each [*positions.shape, head_dim] float32. Negative positions (empty slots) map to 0."""
  angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def rotate(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Applies a precomputed rotation (from `rope_table`, broadcastable to x) to x [..., head_dim]."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates `x` at `positions`.

  Args:
    x: [..., heads, head_dim].
    positions: integer array broadcastable to x.shape[:-1] after adding a trailing axis, i.e. [..., 1] for
      per-token positions shared by the heads, or [..., heads] for per-head positions. Negative positions
      (empty slots) are rotated at 0; attention masks them anyway.
    inv_freq: [head_dim // 2].

  Returns:
    x rotated, in x.dtype (the rotation itself runs in float32, as HF does).
  """
  return rotate(x, *rope_table(positions, inv_freq))
