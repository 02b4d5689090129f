"""One decoder layer at a time through the one forward: its output on given inputs, and the Gram matrices of
the inputs of each of its projections (what SparseGPT, Wanda and the sensitivity tables need).

A layer runs as a one-layer model whose "embedding table" is the layer's input states: tokens
arange(B*T) gather them back, so `lacax.model.llama.run` (with `hidden_layers=(1,)`, no LM head) computes
exactly the decoder layer, with its norms, RoPE, GQA attention and MLP; nothing of the layer is re-written
here. The Gram matrix X^T X of a projection's input X is read through the forward's `ProjectedWeight` plug
point: `_GramTap` computes the projection unchanged and, through a custom VJP, hands X^T X back as the
gradient of a zero probe (one backward pass collects all seven at once, from one statistics pass, as the
reference does).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.model.quantized import LAYER_INPUT_AXES

PROJECTIONS = tuple(LAYER_INPUT_AXES)  # wq, wk, wv, wo, w_gate, w_up, w_down


def num_input_axes(name: str) -> int:
  return len(LAYER_INPUT_AXES[name])


def stacked_layers(params: dict[str, Any], what: str = "params") -> dict[str, Any]:
  """params["layers"] as one stacked dict of dense arrays (compression works on the loaded model)."""
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    raise ValueError(f"{what}['layers'] is a list of {len(layers)} segments; compression expects the stacked "
                     "layers of a loaded model (one dict stacked over all layers)")
  for name in PROJECTIONS:
    if not isinstance(layers.get(name), (jax.Array, np.ndarray)):
      raise ValueError(f"{what}['layers']['{name}'] is a {type(layers.get(name)).__name__}; expected a dense "
                       "array (compress the float model, then pack)")
  return layers


def layer_slice(layers: dict[str, Any], index: int) -> dict[str, Any]:
  """Layer `index` of stacked layers, kept stacked with a leading axis of 1."""
  return jax.tree.map(lambda a: a[index:index + 1], layers)


def _one_layer(layer_p: dict[str, Any], cfg: ModelConfig, x: jax.Array):
  B, T, D = x.shape
  cfg1 = cfg.replace(num_layers=1, vocab_size=B * T, tie_word_embeddings=True, layer_shapes=None)
  params = {"embed": x.reshape(B * T, D), "layers": layer_p, "final_norm": jnp.ones((D,), x.dtype)}
  tokens = jnp.arange(B * T, dtype=jnp.int32).reshape(B, T)
  return params, cfg1, tokens


def run_layer(layer_p: dict[str, Any], cfg: ModelConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
  """The residual stream [B, T, D] after one decoder layer (stacked with a leading axis of 1) on inputs x."""
  params, cfg1, tokens = _one_layer(layer_p, cfg, x)
  out = llama.run(params, tokens, positions, None, cfg1,
                  options=llama.ForwardOptions(hidden_layers=(1,), logits=False))
  return out.hidden[0]


@jax.custom_vjp
def _tap(x: jax.Array, probe: jax.Array) -> jax.Array:
  del probe
  return x


def _tap_fwd(x, probe):
  del probe
  return x, x


def _tap_bwd(x, g):
  flat = x.reshape(-1, int(np.prod(x.shape[2:]))).astype(jnp.float32)
  return g, flat.T @ flat


_tap.defvjp(_tap_fwd, _tap_bwd)


@flax.struct.dataclass
class _GramTap(llama.ProjectedWeight):
  """The dense weight w, plus a zero probe [K, K] (per layer) whose gradient is X^T X of this projection's
  input."""

  w: jax.Array
  probe: jax.Array

  @property
  def shape(self):
    return tuple(self.w.shape)

  def project(self, x, equation, preferred_element_type=None):
    return jnp.einsum(equation, _tap(x, self.probe), self.w, preferred_element_type=preferred_element_type)


def layer_grams(layer_p: dict[str, Any], cfg: ModelConfig, x: jax.Array, positions: jax.Array
                ) -> dict[str, jax.Array]:
  """{projection: X^T X [K, K] float32} of the inputs of each projection of one layer (leading axis 1) run on
  x [B, T, D] (K = the flattened input features: D, or H*hd for wo, F for w_down); sum over all B*T tokens."""

  def probes_loss(probes):
    tapped = dict(layer_p)
    for name in PROJECTIONS:
      tapped[name] = _GramTap(w=layer_p[name], probe=probes[name])
    return jnp.sum(run_layer(tapped, cfg, x, positions).astype(jnp.float32))

  probes = {}
  for name in PROJECTIONS:
    k = int(np.prod(layer_p[name].shape[1:1 + num_input_axes(name)]))
    probes[name] = jnp.zeros((1, k, k), jnp.float32)
  grams = jax.grad(probes_loss)(probes)
  return {name: g[0] for name, g in grams.items()}


layer_grams_jit = jax.jit(layer_grams, static_argnames="cfg")
run_layer_jit = jax.jit(run_layer, static_argnames="cfg")


def embed_inputs(params: dict[str, Any], cfg: ModelConfig, tokens: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(inputs of layer 0 [B, T, D] in the compute dtype, positions [B, T]) of calibration tokens [B, T]."""
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f"calibration tokens have shape {tokens.shape}; expected [batch, length >= 2] token ids")
  if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
    raise ValueError(f"calibration tokens range over [{tokens.min()}, {tokens.max()}]; expected ids in "
                     f"[0, {cfg.vocab_size})")
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x = llama.embed_tokens(params["embed"], jnp.asarray(tokens), cfg.jnp_dtype)  # as llama.run embeds
  return x, positions


def matrix(w: jax.Array, name: str) -> jax.Array:
  """One layer's projection [in..., out...] as [K, N]."""
  n_in = num_input_axes(name)
  return w.reshape(int(np.prod(w.shape[:n_in])), -1)
