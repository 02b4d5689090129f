"""Token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions of logits."""

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


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Chooses one token per row of [B, V] logits; returns [B] int32."""
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
