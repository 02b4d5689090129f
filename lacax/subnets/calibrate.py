"""Calibration: the activation statistics FLAP needs, the residual stream ShortGPT needs, and the DP's metric.

`layer_taps` runs the decoder over teacher-forced batches and returns what the one forward does not (yet)
expose as outputs: the residual stream between layers, each layer's o_proj input (the attention output
heads) and down_proj input (silu(gate) * up). It is built from `lacax.model.llama`'s own pieces (rms_norm,
the RoPE tables, `llama.attention`), and its final residual stream reproduces `llama.forward`'s logits (tested),
so the statistics are those of the model that runs. Subnet *execution* never goes through it: it has no
masks, gates or adapters (see `lacax.subnets.execute`).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.model import rope as rope_lib
from lacax.model.config import ModelConfig
from lacax.subnets.width import ActivationStats


@functools.partial(jax.jit, static_argnames=("cfg",))
def layer_taps(params, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig):
  """Teacher-forced pass recording per-layer activations.

  Args:
    params: model parameters; tokens, positions: [B, T] int32 (positions -1 = padding).

  Returns:
    hidden [L + 1, B, T, D] float32 residual stream (before layer 0, ..., after the last layer, pre-norm),
    attn_in [L, B, T, H, hd] float32 (o_proj inputs), ffn_in [L, B, T, F] float32 (down_proj inputs).
  """
  B, T = tokens.shape
  KV, G, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
  dtype = cfg.jnp_dtype
  cos, sin = rope_lib.rope_table(positions[:, :, None], rope_lib.inv_frequencies(cfg))
  key_pos = jnp.broadcast_to(positions[:, :, None], (B, T, KV))
  x = llama.embed_tokens(params["embed"], tokens, dtype)

  def layer(x, p):
    h = llama.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, p["wq"])
    k = jnp.einsum("btd,dhk->bthk", h, p["wk"])
    v = jnp.einsum("btd,dhk->bthk", h, p["wv"])
    if cfg.attention_bias:
      q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = rope_lib.rotate(q, cos, sin).reshape(B, T, KV, G, hd)
    k = rope_lib.rotate(k, cos, sin)
    out, _ = llama.attention(q, k, v, key_pos, positions, need_probs=False)
    out = out.reshape(B, T, cfg.num_heads, hd)
    x1 = x + jnp.einsum("bthk,hkd->btd", out, p["wo"])
    h = llama.rms_norm(x1, p["mlp_norm"], cfg.rms_norm_eps)
    act = jax.nn.silu(jnp.einsum("btd,df->btf", h, p["w_gate"])) * jnp.einsum("btd,df->btf", h, p["w_up"])
    x2 = x1 + jnp.einsum("btf,fd->btd", act, p["w_down"])
    return x2, (x.astype(jnp.float32), out.astype(jnp.float32), act.astype(jnp.float32))

  x_last, (xs, attn_in, ffn_in) = jax.lax.scan(layer, x, params["layers"])
  hidden = jnp.concatenate([xs, x_last.astype(jnp.float32)[None]], axis=0)
  return hidden, attn_in, ffn_in


def final_logits(params, hidden_last: jax.Array, cfg: ModelConfig) -> jax.Array:
  """[B, T, V] logits from the last residual stream (final norm + LM head), as `llama.forward` computes them."""
  x = llama.rms_norm(hidden_last.astype(cfg.jnp_dtype), params["final_norm"], cfg.rms_norm_eps)
  head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
  head = head if isinstance(head, llama.ProjectedWeight) else head.astype(cfg.jnp_dtype)
  return llama.project(x, head, "btd,vd->btv", preferred_element_type=jnp.float32)


def batch_positions(tokens: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """[B, T] int32 positions 0..T-1 of a batch, -1 where `valid` is False."""
  tokens = np.asarray(tokens)
  pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy()
  if valid is not None:
    pos[~np.asarray(valid, bool)] = -1
  return pos


def collect_statistics(params, cfg: ModelConfig, batches: Iterable[np.ndarray],
                       progress: Callable[[int], None] | None = None) -> tuple[ActivationStats, np.ndarray]:
  """FLAP activation statistics and ShortGPT block influence over calibration batches.

  Args:
    batches: [B, T] int32 token arrays (every token real).

  Returns:
    (ActivationStats, block influence [L] float64).
  """
  from lacax.subnets.depth import block_influence  # pylint: disable=g-import-not-at-top

  stats = ActivationStats.zeros(cfg)
  bi_sum = np.zeros(cfg.num_layers)
  n_tokens = 0
  for i, tokens in enumerate(batches):
    tokens = np.asarray(tokens, np.int32)
    pos = batch_positions(tokens)
    hidden, attn_in, ffn_in = layer_taps(params, jnp.asarray(tokens), jnp.asarray(pos), cfg=cfg)
    stats.add(np.asarray(attn_in), np.asarray(ffn_in), np.ones(tokens.shape, bool))
    bi_sum += block_influence(np.asarray(hidden)) * tokens.size
    n_tokens += tokens.size
    if progress is not None:
      progress(i + 1)
  return stats, bi_sum / max(n_tokens, 1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _gated_nll_sum(params, layer_gate, tokens, positions, cfg):
  logits, _ = llama.forward(params, tokens, positions, None, cfg,
                            options=llama.ForwardOptions(layer_gate=layer_gate))
  lg, tgt = logits[:, :-1], tokens[:, 1:]
  nll = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, tgt[..., None], -1)[..., 0]
  valid = (positions[:, 1:] >= 0).astype(jnp.float32)
  return jnp.sum(nll * valid), jnp.sum(valid)


class DepthMetric:
  """The DP's calibration metric: mean next-token NLL (or perplexity) of the base model with a keep-mask.

  One compiled function serves every mask (the mask is the forward's traced `layer_gate`). `calls` counts the
  evaluations (the reference's cost is sum_n min(n, M) of them).
  """

  def __init__(self, params, cfg: ModelConfig, batches: Sequence[np.ndarray], *, perplexity: bool = False):
    self.params, self.cfg, self.perplexity, self.calls = params, cfg, perplexity, 0
    self.batches = [(jnp.asarray(b, jnp.int32), jnp.asarray(batch_positions(b))) for b in batches]

  def __call__(self, mask: np.ndarray) -> float:
    self.calls += 1
    gate = jnp.asarray(np.asarray(mask, np.float32))
    total, count = 0.0, 0.0
    for tokens, pos in self.batches:
      s, n = _gated_nll_sum(self.params, gate, tokens, pos, cfg=self.cfg)
      total, count = total + float(s), count + float(n)
    nll = total / max(count, 1.0)
    return float(np.exp(nll)) if self.perplexity else nll
