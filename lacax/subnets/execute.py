"""Running a subnet: the masked model (training, evaluation) through `lacax.model.llama.forward`.

A subnet's layer gates, head / FFN-channel masks and its SMoL adapter act on the weights the one forward
reads, exactly:
  * a gated-off layer has its o_proj and down_proj scaled by 0, so both residual branches add exactly 0 and
    the residual passes through (x + 0 == x);
  * a masked KV group has its q/k/v output columns (and biases) zeroed: its heads attend with a uniform softmax
    over zero values and contribute exactly 0, as the reference's mask on the q/k/v outputs does;
  * a masked FFN channel has its gate/up columns zeroed: silu(0) * 0 = 0;
  * the adapter is folded in as W + scale * A_eff B_eff, the same linear map as the reference's
    scale * B_eff (A_eff x) added to W x (lacax.subnets.smol.merge).
All of these are array values of fixed shape, so every subnet of the grid runs through one compiled function.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.subnets import smol as smol_lib
from lacax.subnets.shape import SubnetArrays


def masked_params(params: Mapping[str, Any], arrays: SubnetArrays) -> dict:
  """Base (or adapter-merged) params with the subnet's gates and width masks applied to the weights."""
  layers = dict(params["layers"])
  gate = arrays.layer_gate
  head = arrays.head_mask  # [L, H]
  kv = arrays.kv_mask  # [L, KV]
  ffn = arrays.ffn_mask  # [L, F]
  cast = lambda m, w: m.astype(w.dtype)  # noqa: E731
  layers["wq"] = layers["wq"] * cast(head[:, None, :, None], layers["wq"])
  layers["wk"] = layers["wk"] * cast(kv[:, None, :, None], layers["wk"])
  layers["wv"] = layers["wv"] * cast(kv[:, None, :, None], layers["wv"])
  if "bq" in layers:
    layers["bq"] = layers["bq"] * cast(head[:, :, None], layers["bq"])
    layers["bk"] = layers["bk"] * cast(kv[:, :, None], layers["bk"])
    layers["bv"] = layers["bv"] * cast(kv[:, :, None], layers["bv"])
  layers["wo"] = layers["wo"] * cast(gate[:, None, None, None], layers["wo"])
  layers["w_gate"] = layers["w_gate"] * cast(ffn[:, None, :], layers["w_gate"])
  layers["w_up"] = layers["w_up"] * cast(ffn[:, None, :], layers["w_up"])
  layers["w_down"] = layers["w_down"] * cast(gate[:, None, None], layers["w_down"])
  return {**params, "layers": layers}
