"""ExpectedAttention (NVIDIA/kvpress): keep the tokens future queries are expected to attend to most.

Reference NVIDIA/kvpress `presses/expected_attention_press.py::ExpectedAttentionPress.score` with the query
statistics of `presses/expected_attention_with_stats.py::ExpectedAttentionStatsPress` (pre-computed on
calibration text). Per (layer, row, query head), with the mean mu and covariance Sigma of the pre-RoPE queries:

  1. average RoPE over the next `n_future_positions` positions p = n, ..., n + F - 1 (n = the held length,
     kvpress's q_len): R = mean_p R_p with R_p = diag(cos_p) + diag(sin_p) P (P the rotate-half matrix);
     mu' = R mu, Sigma' = R Sigma R^T;
  2. for the post-RoPE keys k of the held tokens after the first `n_sink`: z = k.mu' / sqrt(d)
     + k^T Sigma' k / (2 d) (the log of E[exp(q.k / sqrt(d))] for Gaussian q; `use_covariance=False` drops
     the second term); softmax over those tokens;
  3. reduce the query heads of each KV head's group (`score_agg`: "mean", kvpress's, "max" or "sum");
  4. with `use_vnorm`: (score + epsilon) * ||v||; the first `n_sink` tokens score max + 1 (always kept).

Two sources of the statistics (`statistics`):

* "calibrated": from `calibrate` (lacax computes them from calibration text with any lacax model: the
  pre-RoPE queries of every layer, each text without its first `n_sink` tokens; mean and covariance with N - 1,
  as kvpress's `collect_queries`), written by `save` and loaded by path (`stats_path`); nothing is downloaded.
* "online": kvpress's default `ExpectedAttentionPress.get_query_statistics`: the mean and covariance of the
  *current prompt's* pre-RoPE queries at positions >= n_sink, per row and query head, the covariance divided by
  N (not N - 1). kvpress recomputes them from the prefill's hidden states inside its hook; lacax's forward
  accumulates the count, sum and sum of outer products of those queries while it runs
  (`StatsRecording(query_moments=n_sink)`), so a chunked prefill gives the one-shot numbers. Two departures,
  both documented where they arise: the covariance is formed as E[q q^T] - mu mu^T from the running sums (the
  same number up to float32 rounding; kvpress centres first), and with `during_decode=True` the moments keep
  accumulating the decode steps' queries (kvpress's DecodingPress would recompute them from its hidden-state
  buffer). After a prefill-time hand-off the moments are dropped (nothing reads them). The moments cost
  [layers, rows, heads, head_dim, head_dim] float32 while the prompt is prefilled (SmolLM2-135M: 4.4 MB a row;
  Llama-3-8B: 67 MB a row), recorded even with `use_covariance=False`.
"""

from __future__ import annotations

import dataclasses
import functools
import io as _io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from lacax import errors
from lacax import io as lacax_io
from lacax.cache import plans
from lacax.cache.base import ScorerPolicy
from lacax.cache.kv_cache import SCORE_AGGS, KVCache, StatsRecording
from lacax.model.config import ModelConfig

FORMAT = "lacax-expected-attention-stats-v1"
STATISTICS = ("calibrated", "online")


def average_rope(start: jax.Array, inv_freq: jax.Array, n_future: int) -> jax.Array:
  """[..., hd, hd] float32 mean rotation over positions start, ..., start + n_future - 1 (start [...] int)."""
  offsets = jnp.arange(n_future, dtype=jnp.float32)
  angles = (start[..., None].astype(jnp.float32) + offsets)[..., None] * inv_freq  # [..., F, hd / 2]
  cos = jnp.mean(jnp.concatenate([jnp.cos(angles)] * 2, -1), axis=-2)  # [..., hd]
  sin = jnp.mean(jnp.concatenate([jnp.sin(angles)] * 2, -1), axis=-2)
  half = inv_freq.shape[-1]
  eye = jnp.eye(half, dtype=jnp.float32)
  zero = jnp.zeros_like(eye)
  rotate_half = jnp.block([[zero, -eye], [eye, zero]])  # rotate_half(q) = P q
  return cos[..., :, None] * jnp.eye(2 * half, dtype=jnp.float32) + sin[..., :, None] * rotate_half


def score_heads(keys: jax.Array, values: jax.Array, valid: jax.Array, mean: jax.Array, cov: jax.Array | None,
                *, n_sink: int = 4, use_vnorm: bool = True, epsilon: float = 0.0, agg: str = "mean") -> jax.Array:
  """Expected-attention scores [..., KV, S] float32.

  Args:
    keys, values: [..., KV, S, D] post-RoPE keys and values; valid [..., KV, S] (a prefix of each head).
    mean: [..., KV, G, D] query means already averaged over the future rotations (mu' = R mu).
    cov: [..., KV, G, D, D] rotated query covariances (R Sigma R^T), or None (`use_covariance=False`).
    n_sink, use_vnorm, epsilon, agg: as `ExpectedAttentionPolicy`.
  """
  keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)
  d = keys.shape[-1]
  z = jnp.einsum("...sd,...gd->...gs", keys, mean) / math.sqrt(d)
  if cov is not None:
    z = z + jnp.einsum("...sd,...gde,...se->...gs", keys, cov, keys) / d / 2
  slot = jnp.arange(keys.shape[-2])
  scored = (valid & (slot >= n_sink))[..., None, :]  # [..., KV, 1, S]
  z = jnp.where(scored, z, -jnp.inf)
  probs = jnp.where(scored, jax.nn.softmax(z, axis=-1), 0.0)
  score = {"mean": jnp.mean, "max": jnp.max, "sum": jnp.sum}[agg](probs, axis=-2)
  if use_vnorm:
    score = (score + epsilon) * jnp.linalg.norm(values, axis=-1)
  top = jnp.max(jnp.where(valid & (slot >= n_sink), score, -jnp.inf), axis=(-2, -1), keepdims=True)
  return jnp.where(slot < n_sink, jnp.where(jnp.isfinite(top), top, 0.0) + 1.0, score)


def statistics_from_queries(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """queries [L, N, H, hd] pre-RoPE -> (mean [L, H, hd], cov [L, H, hd, hd]) float32, cov with N - 1."""
  q = np.asarray(queries, np.float64)
  if q.shape[1] < 2:
    raise ValueError(f"query statistics need at least 2 calibration tokens; got {q.shape[1]}")
  mean = q.mean(axis=1)
  centred = q - mean[:, None]
  cov = np.einsum("lnhi,lnhj->lhij", centred, centred) / (q.shape[1] - 1)
  return mean.astype(np.float32), cov.astype(np.float32)


def calibrate(params, cfg: ModelConfig, prompts, *, n_sink: int = 4, bucket: int = 64):
  """(mean [L, H, hd], cov [L, H, hd, hd]) of the model's pre-RoPE queries on the token lists `prompts`, each
  without its first `n_sink` tokens (kvpress's `collect_queries`)."""
  queries = plans.calibration_queries(params, cfg, prompts, rotated=False, skip=n_sink, bucket=bucket)
  return statistics_from_queries(queries)


def save(path: str, mean: np.ndarray, cov: np.ndarray, *, n_sink: int = 4) -> None:
  """Writes the statistics to `path` (.npz, atomically)."""
  mean, cov = np.asarray(mean, np.float32), np.asarray(cov, np.float32)
  if mean.ndim != 3 or cov.shape != mean.shape + (mean.shape[-1],):
    raise ValueError(f"statistics must be mean [L, H, hd] and cov [L, H, hd, hd]; got {mean.shape}, {cov.shape}")
  buf = _io.BytesIO()
  np.savez(buf, mean=mean, cov=cov, n_sink=np.asarray(n_sink), format=np.asarray(FORMAT))
  lacax_io.atomic_write_bytes(path, buf.getvalue())


@functools.lru_cache(maxsize=8)
def load(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, cov) saved at `path` by `save`.

  Raises:
    lacax.errors.FileFormatError: not a statistics file.
  """
  problem = lacax_io.check_readable(path, "ExpectedAttention stats_path")
  if problem:
    raise errors.FileFormatError(path, problem)
  try:
    with np.load(path) as data:
      if str(data["format"]) != FORMAT:
        raise errors.FileFormatError(path, f"format {str(data['format'])!r}, expected {FORMAT!r}")
      return np.asarray(data["mean"], np.float32), np.asarray(data["cov"], np.float32)
  except (OSError, ValueError, KeyError) as e:
    if isinstance(e, errors.FileFormatError):
      raise
    raise errors.FileFormatError(path, f"not a statistics .npz file written by "
                                 f"lacax.cache.expected_attention.save ({e})")


@dataclasses.dataclass(frozen=True)
class ExpectedAttentionPolicy(ScorerPolicy):
  """ExpectedAttention: the `budget` tokens of every (layer, row, KV head) of largest expected attention.

  Attributes:
    budget: tokens kept per (layer, row, KV head).
    stats_path: query statistics written by `save` (from `calibrate`); required to compact ("" builds the
      policy, e.g. for the registry's defaults, but `compact` raises).
    n_future_positions: future positions RoPE is averaged over (512).
    n_sink: leading tokens always kept (4).
    use_covariance: include the covariance term (True).
    use_vnorm: rescale by the value norms (True).
    epsilon: added before the value rescaling (0).
    score_agg: reduction of the query heads of a group: "mean" (kvpress), "max" or "sum".
    during_decode: False (kvpress): compress the prompt once at the prefill hand-off; True: evict at every step
      (the future positions then start after the newest token).
    rope_mode: "original" (default), "slot" or "stored".
    max_new_tokens: decode tokens a prefill-time policy's decode cache leaves room for (None: the whole run).
    statistics: "calibrated" (default: the file `stats_path`) or "online" (the prompt's own queries, kvpress's
      ExpectedAttentionPress; `stats_path` is then not read).
  """

  budget: int
  stats_path: str = ""
  n_future_positions: int = 512
  n_sink: int = 4
  use_covariance: bool = True
  use_vnorm: bool = True
  epsilon: float = 0.0
  score_agg: str = "mean"
  during_decode: bool = False
  rope_mode: str = "original"
  max_new_tokens: int | None = None
  statistics: str = "calibrated"

  def __post_init__(self):
    self._validate("ExpectedAttention")
    if self.statistics not in STATISTICS:
      raise ValueError(f"ExpectedAttention statistics={self.statistics!r} must be one of {list(STATISTICS)}")
    plans.check_int("ExpectedAttention", "n_future_positions", self.n_future_positions, 1)
    plans.check_int("ExpectedAttention", "n_sink", self.n_sink, 0)
    if self.score_agg not in SCORE_AGGS:
      raise ValueError(f"ExpectedAttention score_agg={self.score_agg!r} must be one of {list(SCORE_AGGS)}")
    if not isinstance(self.stats_path, (str, os.PathLike)):
      raise ValueError(f"ExpectedAttention stats_path={self.stats_path!r} must be a path to a statistics file")

  @property
  def name(self) -> str:
    return "expectedattention"

  @property
  def stats_recording(self) -> StatsRecording | None:
    return StatsRecording(query_moments=self.n_sink) if self.statistics == "online" else None

  def calibrated_statistics(self, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
    """(mean [L, H, hd], cov [L, H, hd, hd]) from `stats_path`, checked against the cache's shape."""
    if not self.stats_path:
      raise ValueError("ExpectedAttention stats_path is empty: compute query statistics with "
                       "lacax.cache.expected_attention.calibrate, save them with expected_attention.save and pass "
                       "the file as stats_path (cache.expected_attention_stats)")
    mean, cov = load(os.fspath(self.stats_path))
    kv, d = cache.k.shape[3], cache.k.shape[4]
    if mean.shape[0] != cache.num_layers or mean.shape[1] % kv or mean.shape[2] != d:
      raise errors.FileFormatError(self.stats_path, f"statistics of shape {mean.shape} [layers, heads, head_dim] "
                                   f"do not fit this model's cache ({cache.num_layers} layers, {kv} kv heads of "
                                   f"{d})")
    return mean, cov

  @property
  def sink_tokens(self) -> int:
    return min(self.n_sink, self.budget)  # they score above every other token; ties go to the older one

  def run_problems(self, cfg) -> list[str]:
    if self.statistics != "calibrated":
      return []
    if not self.stats_path:
      return ["ExpectedAttention statistics='calibrated' needs its query statistics (cache.expected_attention_stats "
              "is empty): compute them for this model with `python -m experiments.calibrate_scorers` "
              "(lacax.cache.expected_attention.calibrate), or set cache.expected_attention_statistics='online'"]
    try:
      mean, _ = load(os.fspath(self.stats_path))
    except errors.FileFormatError as e:
      return [str(e)]
    if mean.shape != (cfg.num_layers, cfg.num_heads, cfg.head_dim):
      return [f"ExpectedAttention stats_path={os.fspath(self.stats_path)!r}: statistics of shape {mean.shape} "
              f"[layers, heads, head_dim] are another model's; {cfg.name} needs "
              f"{(cfg.num_layers, cfg.num_heads, cfg.head_dim)}"]
    return []

  def query_statistics(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """(mean, cov) of the pre-RoPE queries, by `statistics`: [L, H, hd] and [L, H, hd, hd] from the file
    ("calibrated"), [L, B, H, hd] and [L, B, H, hd, hd] float32 of each row's prompt ("online")."""
    if self.statistics == "calibrated":
      mean, cov = self.calibrated_statistics(cache)
      return jnp.asarray(mean), jnp.asarray(cov)
    if cache.stats is None or cache.stats.q_sum is None:
      raise ValueError("ExpectedAttention statistics='online' needs a cache recording query moments "
                       "(StatsRecording(query_moments=n_sink)); build the cache with the policy's init()")
    return cache.stats.query_mean_cov()

  def score(self, cache: KVCache) -> jax.Array:
    mean, cov = self.query_statistics(cache)
    num_layers, num_heads, d = mean.shape[0], mean.shape[-2], mean.shape[-1]
    kv = cache.k.shape[3]
    inv_freq = self.inv_freq(cache)
    start = jnp.max(cache.pos, axis=(2, 3)) + 1  # [L, B]: the next position, kvpress's q_len at prefill
    rot = average_rope(start, inv_freq, self.n_future_positions)  # [L, B, D, D]
    b = "b" if mean.ndim == 4 else ""  # online statistics are per row
    mean_r = jnp.einsum(f"lbij,l{b}hj->lbhi", rot, mean).reshape(num_layers, -1, kv, num_heads // kv, d)
    cov_r = None
    if self.use_covariance:
      cov_r = jnp.einsum(f"lbij,l{b}hjk,lbmk->lbhim", rot, cov, rot)
      cov_r = cov_r.reshape(num_layers, -1, kv, num_heads // kv, d, d)
    keys = plans.head_major(plans.scoring_keys(cache, "post_rope", inv_freq))
    scores = score_heads(keys, plans.head_major(cache.float_values()), plans.head_major(cache.valid()), mean_r, cov_r,
                         n_sink=self.n_sink, use_vnorm=self.use_vnorm, epsilon=self.epsilon, agg=self.score_agg)
    return plans.slot_major(scores)

