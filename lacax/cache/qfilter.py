"""Q-Filters (arXiv 2503.02812): score keys by their projection on one learned direction per (layer, KV head).

Reference NVIDIA/kvpress `presses/qfilter_press.py::QFilterPress.score`: scores = -(q_filter[layer] * keys).sum(-1)
on the post-RoPE cache keys, the filters [L, KV, D] downloaded from the Hugging Face hub (`nthngdy/<model>_qfilt`).
lacax never downloads: `calibrate` computes the filters from calibration text with any lacax model, `save` writes
them to an `.npz` file and `QFilterPolicy(filters_path=...)` loads them by path.

Calibration (the Q-Filters construction): for each (layer, KV head), stack the post-RoPE queries of the G query
heads of its group over every calibration token; u = their first right singular vector, signed so that the
mean projection <q, u> is positive, so that E_q[<q, k>] grows with <k, u>. The stored filter is -u, so that
kvpress's score -(filter . k) = <u, k> keeps the keys the average query attends to most. The file records the
model shape it was calibrated for; a mismatched file is an error naming both shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import io as _io
import os

import jax
import jax.numpy as jnp
import numpy as np

from lacax import errors
from lacax import io as lacax_io
from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig

FORMAT = "lacax-qfilters-v1"


def score_heads(keys: jax.Array, filters: jax.Array) -> jax.Array:
  """keys [..., KV, S, D] (post-RoPE), filters [..., KV, D] -> [..., KV, S] float32 -(filter . k)."""
  return -jnp.einsum("...sd,...d->...s", keys.astype(jnp.float32), filters.astype(jnp.float32))


def filters_from_queries(queries: np.ndarray, num_kv_heads: int) -> np.ndarray:
  """queries [L, N, H, hd] (N calibration tokens) -> filters [L, KV, hd] float32 (-u, see the module docstring)."""
  num_layers, _, num_heads, head_dim = queries.shape
  group = num_heads // num_kv_heads
  out = np.zeros((num_layers, num_kv_heads, head_dim), np.float32)
  for layer in range(num_layers):
    for head in range(num_kv_heads):
      q = np.asarray(queries[layer, :, head * group:(head + 1) * group], np.float64).reshape(-1, head_dim)
      u = np.linalg.svd(q, full_matrices=False)[2][0]
      if np.mean(q @ u) < 0:
        u = -u
      out[layer, head] = -u
  return out


def calibrate(params, cfg: ModelConfig, prompts, *, bucket: int = 64) -> np.ndarray:
  """Q-Filters [L, KV, hd] float32 of the model from calibration token lists `prompts` (list of list of ids).

  Raises:
    ValueError: no calibration tokens.
  """
  queries = plans.calibration_queries(params, cfg, prompts, rotated=True, bucket=bucket)
  return filters_from_queries(queries, cfg.num_kv_heads)


def save(path: str, filters: np.ndarray) -> None:
  """Writes filters [L, KV, hd] to `path` (.npz, atomically)."""
  filters = np.asarray(filters, np.float32)
  if filters.ndim != 3:
    raise ValueError(f"Q-Filters must be [layers, kv_heads, head_dim]; got shape {filters.shape}")
  buf = _io.BytesIO()
  np.savez(buf, filters=filters, format=np.asarray(FORMAT))
  lacax_io.atomic_write_bytes(path, buf.getvalue())


@functools.lru_cache(maxsize=8)
def load(path: str) -> np.ndarray:
  """The filters [L, KV, hd] float32 saved at `path` by `save`.

  Raises:
    lacax.errors.FileFormatError: not a Q-Filter file.
  """
  problem = lacax_io.check_readable(path, "QFilter filters_path")
  if problem:
    raise errors.FileFormatError(path, problem)
  try:
    with np.load(path) as data:
      if str(data["format"]) != FORMAT:
        raise errors.FileFormatError(path, f"format {str(data['format'])!r}, expected {FORMAT!r}")
      filters = np.asarray(data["filters"], np.float32)
  except (OSError, ValueError, KeyError) as e:
    if isinstance(e, errors.FileFormatError):
      raise
    raise errors.FileFormatError(path, f"not a Q-Filter .npz file written by lacax.cache.qfilter.save ({e})")
  if filters.ndim != 3:
    raise errors.FileFormatError(path, f"filters have shape {filters.shape}, expected [layers, kv_heads, head_dim]")
  return filters


@dataclasses.dataclass(frozen=True)
class QFilterPolicy(ScorerPolicy):
  """Q-Filter: the `budget` keys of every (layer, row, KV head) with the largest <k, u> (u: the query direction).

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    filters_path: an `.npz` written by `save` (e.g. from `calibrate` on calibration text); required to
      compact ("" builds the policy, e.g. for the registry's defaults, but `compact` raises).
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step.
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
  """

  budget: int
  filters_path: str = ""
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None

  def __post_init__(self):
    self._validate("QFilter")
    if not isinstance(self.filters_path, (str, os.PathLike)):
      raise ValueError(f"QFilter filters_path={self.filters_path!r} must be a path to a Q-Filter .npz file")

  def run_problems(self, cfg) -> list[str]:
    if not self.filters_path:
      return ["QFilter needs its filters (cache.qfilter_path is empty): compute them for this model with "
              "`python -m experiments.calibrate_scorers` (lacax.cache.qfilter.calibrate) and pass the file"]
    try:
      filters = load(os.fspath(self.filters_path))
    except errors.FileFormatError as e:
      return [str(e)]
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if filters.shape != want:
      return [f"QFilter filters_path={os.fspath(self.filters_path)!r}: filters of shape {filters.shape} [layers, "
              f"kv_heads, head_dim] are another model's; {cfg.name} needs {want}"]
    return []

  def filters(self, cache: KVCache) -> np.ndarray:
    if not self.filters_path:
      raise ValueError("QFilter filters_path is empty: compute filters with lacax.cache.qfilter.calibrate, save them "
                       "with qfilter.save and pass the file as filters_path (cache.qfilter_path)")
    filters = load(os.fspath(self.filters_path))
    want = (cache.num_layers, cache.k.shape[3], cache.k.shape[4])
    if filters.shape != want:
      raise errors.FileFormatError(self.filters_path, f"filters of shape {filters.shape} [layers, kv_heads, "
                                   f"head_dim] do not fit this model's cache, which needs {want}")
    return filters

  def score(self, cache: KVCache) -> jax.Array:
    filters = jnp.asarray(self.filters(cache))[:, None]  # [L, 1, KV, D]
    keys = plans.head_major(plans.scoring_keys(cache, "post_rope", self.inv_freq(cache)))
    return plans.slot_major(score_heads(keys, filters))
