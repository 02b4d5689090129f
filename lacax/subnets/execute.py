"""Running a subnet: any shape of the grid through `lacax.model.llama.forward`'s extension options.

A shape's `SubnetArrays` become the forward's traced options: `layer_gate` (a gated-off layer passes its
residual stream through exactly), `head_mask` (whole KV groups of query heads; a masked head contributes
exactly 0, as if its rows of wo were sliced away), `ffn_mask` (FFN channels), the compensation biases as the
optional `bo` / `b_down` layer parameters, and the shape's SMoL adapter as `lora` (the reference adds the LoRA
output before its width mask; masking the head / channel outputs after the projection is the same, since the
masked outputs are zeroed either way). All are array values of fixed shape: every subnet of the grid runs
through one compiled function.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.subnets import smol as smol_lib
from lacax.subnets.shape import SubnetArrays


def with_biases(params: Mapping[str, Any], arrays: SubnetArrays, dtype: Any) -> dict:
  """params with the shape's compensation biases as the layers' `bo` / `b_down` [L, D]."""
  layers = {**params["layers"], "bo": arrays.attn_bias.astype(dtype), "b_down": arrays.ffn_bias.astype(dtype)}
  return {**params, "layers": layers}


def subnet_options(arrays: SubnetArrays, adapter: Any = None, smol_cfg: smol_lib.SMoLConfig | None = None,
                   **options) -> llama.ForwardOptions:
  """The forward options of a shape (plus any other `ForwardOptions` fields, e.g. hidden_layers)."""
  return llama.ForwardOptions(layer_gate=arrays.layer_gate, head_mask=arrays.head_mask, ffn_mask=arrays.ffn_mask,
                              lora=adapter, lora_config=smol_cfg if adapter is not None else None, **options)


def subnet_logits(params: Mapping[str, Any], tokens: jax.Array, positions: jax.Array, cfg: ModelConfig,
                  arrays: SubnetArrays, smol_params: Any = None, smol_cfg: smol_lib.SMoLConfig | None = None,
                  router_rng: jax.Array | None = None) -> jax.Array:
  """[B, T, V] logits of the subnet `arrays` (with its SMoL adapter when `smol_params` is given).

  `router_rng` turns the router's noise on (training); None gives the deterministic evaluation gate.
  """
  adapter = None
  if smol_params is not None:
    adapter = smol_lib.shape_adapter(smol_params, arrays.encoding, smol_cfg, router_rng)
  logits, _ = llama.forward(with_biases(params, arrays, cfg.jnp_dtype), tokens, positions, None, cfg,
                            options=subnet_options(arrays, adapter, smol_cfg))
  return logits
