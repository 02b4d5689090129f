"""SMoL: the shape-aware mixture of LoRAs of AmoebaLLM (arXiv 2411.10606).

Reference (GATECH-EIC/AmoebaLLM `peft/.../lora/layer.py::update_layer`, `bnb.py::forward`, `moe.py`):

  * every target projection (q, k, v, o, gate, up, down) carries `num_experts` = 5 LoRA experts (A_i, B_i),
    rank 64, alpha 16 (scale alpha / r), dropout 0;
  * ONE router for the whole model reads the shape encoding (layer mask ++ one-hot width, [L + W]):
    logits = W2 (W1 e + b1) + b2 (a [L+W] -> 16 -> E linear pair, no nonlinearity between), plus noise
    N(0, 1) * softplus(Wn e + bn) ("noisy top-k", the makemoe formulation); the top-2 logits are softmaxed and
    every other gate is exactly 0;
  * experts are mixed in weight space: A_eff = sum_i g_i A_i, B_eff = sum_i g_i B_i, and the layer adds
    scale * B_eff (A_eff x) (cross terms included; this is not sum_i g_i B_i A_i x);
  * the gate is computed once per shape and shared by every token and every layer; no load-balancing loss.

lacax evaluates deterministically (`rng=None`: no noise; the reference keeps the noise on at evaluation), so a
shape has exactly one adapter, which `merge` folds into the base weights for export.

Parameter layout (L layers, E experts, r rank; `in...`/`out...` the projection's input/output axes, e.g.
wq: in = (D,), out = (H, hd); wo: in = (H, hd), out = (D,)), keyed by the forward's projection names:
  router: w1 [L+W, R], b1 [R], w2 [R, E], b2 [E], w_noise [L+W, E], b_noise [E]   (R = router_hidden = 16)
  experts[wq|wk|wv|wo|w_gate|w_up|w_down]: a [L, E, in..., r], b [L, E, r, out...]   (b starts at zero)
A mixed adapter drops the E axis: {projection: {"a": [L, in..., r], "b": [L, r, out...]}}, the LoRA layout
`lacax.model.llama.ForwardOptions.lora` takes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

# SMoL target name -> parameter name in lacax.model.llama's layer pytree, and its number of input axes.
TARGETS = {"q": ("wq", 1), "k": ("wk", 1), "v": ("wv", 1), "o": ("wo", 2), "gate": ("w_gate", 1),
           "up": ("w_up", 1), "down": ("w_down", 1)}


@dataclasses.dataclass(frozen=True)
class SMoLConfig:
  """SMoL hyper-parameters (reference defaults)."""

  num_experts: int = 5
  top_k: int = 2
  rank: int = 64
  alpha: float = 16.0
  router_hidden: int = 16
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      raise ValueError(f"SMoLConfig.targets has unknown projection(s) {unknown}; expected a subset of {list(TARGETS)}")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"SMoLConfig.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
    for name in ("num_experts", "rank", "router_hidden"):
      if getattr(self, name) < 1:
        raise ValueError(f"SMoLConfig.{name}={getattr(self, name)} must be >= 1")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def projections(self) -> tuple[str, ...]:
    """The forward's parameter names of the targets (wq, ..., w_down)."""
    return tuple(TARGETS[t][0] for t in self.targets)



def _linear(key, fan_in: int, fan_out: int) -> tuple[jax.Array, jax.Array]:
  """torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)
  kw, kb = jax.random.split(key)
  return (jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
          jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound))


def init_smol(key: jax.Array, base_params: Mapping[str, Any], encoding_size: int, cfg: SMoLConfig) -> dict:
  """Router at torch's Linear init, experts' A at kaiming-uniform(a=sqrt(5)) (peft's), B at zero."""
  keys = jax.random.split(key, 3 + len(cfg.targets))
  w1, b1 = _linear(keys[0], encoding_size, cfg.router_hidden)
  w2, b2 = _linear(keys[1], cfg.router_hidden, cfg.num_experts)
  wn, bn = _linear(keys[2], encoding_size, cfg.num_experts)
  experts = {}
  for k, target in zip(keys[3:], cfg.targets):
    name, n_in = TARGETS[target]
    shape = tuple(base_params["layers"][name].shape)
    L, in_axes, out_axes = shape[0], shape[1:1 + n_in], shape[1 + n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_axes))
    experts[name] = {
        "a": jax.random.uniform(k, (L, cfg.num_experts, *in_axes, cfg.rank), jnp.float32, -bound, bound),
        "b": jnp.zeros((L, cfg.num_experts, cfg.rank, *out_axes), jnp.float32),
    }
  return {"router": {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w_noise": wn, "b_noise": bn}, "experts": experts}


def router_logits(router: Mapping[str, jax.Array], encoding: jax.Array, rng: jax.Array | None = None
                  ) -> jax.Array:
  """[E] router logits of one shape encoding [L + W]; with `rng`, plus the noisy-top-k noise."""
  logits = (encoding @ router["w1"] + router["b1"]) @ router["w2"] + router["b2"]
  if rng is not None:
    noise_scale = jax.nn.softplus(encoding @ router["w_noise"] + router["b_noise"])
    logits = logits + jax.random.normal(rng, logits.shape, logits.dtype) * noise_scale
  return logits


def gates(router: Mapping[str, jax.Array], encoding: jax.Array, top_k: int, rng: jax.Array | None = None
          ) -> jax.Array:
  """[E] gates: softmax over the top-k (noisy, with `rng`) logits; the others exactly 0; they sum to 1."""
  logits = router_logits(router, encoding, rng)
  top, idx = jax.lax.top_k(logits, top_k)
  sparse = jnp.full_like(logits, -jnp.inf).at[idx].set(top)
  return jax.nn.softmax(sparse)


def mix(experts: Mapping[str, Mapping[str, jax.Array]], g: jax.Array) -> dict:
  """Weight-space mixture: {projection: {"a": [L, in..., r], "b": [L, r, out...]}} = sum_i g_i (A_i, B_i)."""
  return {name: {"a": jnp.tensordot(g, e["a"], axes=(0, 1)), "b": jnp.tensordot(g, e["b"], axes=(0, 1))}
          for name, e in experts.items()}


def merge(base_params: Mapping[str, Any], adapter: Mapping[str, Mapping[str, jax.Array]], scale: float) -> dict:
  """Base params with every adapted projection W replaced by W + scale * A B (the exact adapter forward)."""
  layers = dict(base_params["layers"])
  for name, ab in adapter.items():
    w = layers[name]
    L, r = ab["a"].shape[0], ab["a"].shape[-1]
    delta = jnp.einsum("lir,lro->lio", ab["a"].reshape(L, -1, r), ab["b"].reshape(L, r, -1)) * scale
    layers[name] = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
  return {**base_params, "layers": layers}


def shape_adapter(smol_params: Mapping[str, Any], encoding: jax.Array, cfg: SMoLConfig,
                  rng: jax.Array | None = None) -> dict:
  """The one adapter (mixed experts) of a shape; deterministic without `rng`."""
  return mix(smol_params["experts"], gates(smol_params["router"], encoding, cfg.top_k, rng))
