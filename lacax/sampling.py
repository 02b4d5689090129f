"""Token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions of logits.

`filter_logits` states the filters over the whole vocabulary (a sort for top-p). `sample` draws from the same
distribution without that sort or a Gumbel draw per vocabulary entry, both of which dominated a CPU decode step
at a large vocabulary (SmolLM2's 49152 tokens, 64 rows: 3.7 s a step with a full sort, 0.35 s for the Gumbel
draws alone, against about 20 ms here):
  * top-p: the nucleus is read off the `TOP_P_CANDIDATES` most likely tokens (`lax.top_k`, normalised by the
    log-sum-exp of all logits) whenever they cover the mass top_p in every row and the threshold is not tied
    with a token outside them; otherwise (a flat distribution in any row of the batch) the nucleus threshold is
    found without a sort, by a bisection over the float32 order of the logits (`nucleus_mask`: 32 masked sums
    over the vocabulary: at 64 rows of 49152 tokens, 0.34 s against the sort's 1.5 s on a loaded 2-core Xeon;
    one row with a flat distribution sends the whole batch down this path);
  * the token: one uniform draw per row, inverted through the cumulative probabilities of the kept tokens
    (exact in distribution, up to float32 rounding of the cumulative sum).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen. temperature == 0 means greedy (top_k / top_p are then ignored).

  Attributes:
    temperature: softmax temperature; 0 for greedy argmax.
    top_k: keep the k most likely tokens (0 = no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = no limit).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k={self.top_k} must be >= 0 (0 disables top-k)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Applies temperature, top-k and top-p to [..., V] logits; filtered entries become -inf."""
  logits = logits.astype(jnp.float32) / cfg.temperature
  neg_inf = jnp.finfo(jnp.float32).min
  if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Probability mass strictly before each sorted entry; an entry is kept while that mass is < top_p, so the
    # most likely token always survives.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < cfg.top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


TOP_P_CANDIDATES = 256  # tokens the top-p fast path reads the nucleus from


def _order_key(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (an involution up to the sign flip; see `_from_order_key`)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key: jax.Array) -> jax.Array:
  bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def nucleus_mask(logits: jax.Array, top_p: float, probs: jax.Array | None = None) -> jax.Array:
  """[B, V] bool: the tokens `filter_logits` keeps for top-p over [B, V] (already scaled) logits, without a sort.

  A token of logit l is kept iff the mass strictly above it, M(l) = sum(p[logits > l]), is < top_p (the first
  of tied tokens in the sort has exactly that mass before it, and ties are kept together). M is non-increasing,
  so the kept set is {logits > x*} with x* the largest float32 with M(x*) >= top_p: found by bisection over the
  uint32 keys that order float32 values (32 halvings of [just below the row's min, the row's max]). Equal to
  the sort up to the float32 rounding of the two ways of summing the mass. `probs`: softmax(logits) where the
  caller has it already.
  """
  probs = jax.nn.softmax(logits, axis=-1) if probs is None else probs
  keys = _order_key(logits)
  lo = jnp.min(keys, axis=-1) - 1  # M(lo) = 1 >= top_p (a key below every logit; the min is never key 0)
  hi = jnp.max(keys, axis=-1)  # M(hi) = 0 < top_p

  def mass_above(key):
    return jnp.sum(jnp.where(keys > key[:, None], probs, 0.0), axis=-1)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    above = mass_above(mid) >= top_p
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return keys > lo[:, None]


def inverse_cdf(weights: jax.Array, rng: jax.Array) -> jax.Array:
  """[..., N] non-negative weights (not all zero) -> [...] int32 index drawn with probability weight / sum."""
  cdf = jnp.cumsum(weights, axis=-1)
  u = jax.random.uniform(rng, cdf.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
  return jnp.minimum(jnp.sum(cdf <= u, axis=-1), weights.shape[-1] - 1).astype(jnp.int32)


def _nucleus_of_candidates(logits: jax.Array, top_p: float):
  """(candidate token ids [B, C], their weights in the nucleus [B, C], whether the candidates decide it)."""
  count = min(TOP_P_CANDIDATES, logits.shape[-1])
  values, ids = jax.lax.top_k(logits, count)  # descending
  probs = jnp.exp(values - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  threshold = jnp.min(jnp.where(keep, values, jnp.inf), axis=-1, keepdims=True)
  # min, not values[..., -1]: XLA:CPU turns a top-k whose last entry is sliced out into a full sort (8 s).
  covered = (jnp.sum(probs, axis=-1) >= top_p) | (count == logits.shape[-1])
  untied = (jnp.min(values, axis=-1) < threshold[..., 0]) | (count == logits.shape[-1])
  return ids, jnp.where(values >= threshold, probs, 0.0), jnp.all(covered & untied)


def greedy_ids(logits: jax.Array) -> jax.Array:
  """`jnp.argmax(logits, axis=-1)` as int32, ties and NaN included (the first maximum; the first NaN wins
  over any number), computed as a max and then the first index that reaches it. XLA:CPU lowers argmax to a
  variadic (value, index) reduce that does not vectorise: 228 us per decode step over SmolLM2's 49152 logits in
  a per-thunk trace, against about 15 us for the two plain reductions."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  hit = (logits == top) | jnp.isnan(logits)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Chooses one token per row of [B, V] logits; returns [B] int32 (see the module docstring)."""
  if cfg.greedy:
    return greedy_ids(logits)
  logits = logits.astype(jnp.float32)

  scaled = filter_logits(logits, dataclasses.replace(cfg, top_p=1.0))  # temperature and top-k
  if cfg.top_p >= 1.0:
    return inverse_cdf(jax.nn.softmax(scaled, axis=-1), rng)

  ids, weights, decided = _nucleus_of_candidates(scaled, cfg.top_p)

  def candidates(ids, weights):
    return jnp.take_along_axis(ids, inverse_cdf(weights, rng)[:, None], axis=-1)[:, 0].astype(jnp.int32)

  def whole_vocabulary(*_):
    probs = jax.nn.softmax(scaled, axis=-1)
    return inverse_cdf(jnp.where(nucleus_mask(scaled, cfg.top_p, probs), probs, 0.0), rng)

  return jax.lax.cond(decided, candidates, whole_vocabulary, ids, weights)
