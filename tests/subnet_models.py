"""A tiny GQA Llama and calibration data shared by the subnet tests (random weights large enough to matter)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.model.config import ModelConfig

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=8, num_heads=4, num_kv_heads=2,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, name="tiny-subnets")


# A shallower twin for tests that compile one sliced model per grid shape.
CFG4 = CFG.replace(num_layers=4, name="tiny-subnets-4")


@functools.lru_cache(maxsize=None)
def params(seed: int = 0, std: float = 0.12, num_layers: int = 8):
  return llama.init_params(CFG.replace(num_layers=num_layers), jax.random.PRNGKey(seed), std=std)


@functools.lru_cache(maxsize=None)
def _transitions() -> np.ndarray:
  """A fixed sparse chain on the previous two tokens: the successor set depends on the previous token, the
  choice within it on the one before (so attention matters)."""
  rng = np.random.RandomState(1234)
  V = CFG.vocab_size
  succ = rng.choice(V, size=(V, 3))  # successors of the previous token
  pick = rng.randint(0, 3, size=V)  # which successor the token before that prefers
  trans = np.full((V, V, V), 0.0)
  for a in range(V):
    for b in range(V):
      trans[a, b, succ[b]] = 0.1
      trans[a, b, succ[b, pick[a]]] += 0.7
  return trans


def batches(n: int, batch: int = 4, length: int = 24, seed: int = 0) -> list[np.ndarray]:
  """Token batches of the fixed chain (every call with the same seed gives the same data)."""
  rng = np.random.RandomState(seed)
  cum = np.cumsum(_transitions(), axis=-1)
  out = []
  for _ in range(n):
    toks = np.zeros((batch, length), np.int32)
    toks[:, :2] = rng.randint(0, CFG.vocab_size, (batch, 2))
    for t in range(2, length):
      u = rng.rand(batch, 1)
      row = cum[toks[:, t - 2], toks[:, t - 1]]
      toks[:, t] = np.minimum((u > row).sum(axis=1), CFG.vocab_size - 1)
    out.append(toks)
  return out


@functools.lru_cache(maxsize=None)
def trained_params(steps: int = 200, seed: int = 0, num_layers: int = 8):
  """The tiny model trained on the chain (AdamW, a few seconds), so that its layers carry real signal."""
  import optax  # pylint: disable=g-import-not-at-top

  cfg = CFG.replace(num_layers=num_layers)
  p = params(seed, std=0.05, num_layers=num_layers)
  opt = optax.adamw(1e-2, weight_decay=0.0)
  state = opt.init(p)

  def loss(p, toks):
    logits, _ = llama.forward(p, toks, positions(toks), None, cfg)
    lg, tgt = logits[:, :-1], toks[:, 1:]
    return jnp.mean(jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, tgt[..., None], -1)[..., 0])

  @jax.jit
  def step(p, state, toks):
    l, g = jax.value_and_grad(loss)(p, toks)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state, l

  data = batches(steps, batch=8, length=32, seed=10_000 + seed)
  for toks in data:
    p, state, _ = step(p, state, jnp.asarray(toks))
  return p


def positions(tokens) -> jnp.ndarray:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
