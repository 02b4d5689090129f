"""`apply_policy`: prune and quantize a model per a `CompressionPolicy`; perplexity versus memory.

Order (the reference's, where it has one): layers are processed in depth order; layer l is pruned from the
Gram matrices of its inputs as produced by layers 0..l-1 already pruned *and* quantized (weights and
activations as the policy says), then quantized, and its compressed outputs feed layer l+1. Weights that are
pruned are exact zeros, and stay zeros under the symmetric quantizer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from lacax.compress import packed, prune
from lacax.compress.policy import CompressionPolicy, policy_bytes
from lacax.compress.sensitivity import SensitivityMismatch, model_identity
from lacax.model.config import ModelConfig


def apply_policy(params: dict[str, Any], model_cfg: ModelConfig, policy: CompressionPolicy,
                 calib_tokens: np.ndarray, *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
  """The model compressed by `policy` (validated against `model_cfg`; a policy built for another model, by its
  `model` identity, is refused), calibrated on tokens [B, T]. Returns params for `lacax.model.llama.run`."""
  policy.validate(model_cfg)
  if policy.model:
    here = model_identity(params, model_cfg)
    if (policy.model.get("config_hash"), policy.model.get("weights_digest")) != (here["config_hash"],
                                                                                 here["weights_digest"]):
      raise SensitivityMismatch(f"the compression policy was built for model {policy.model.get('name')!r} "
                                f"({policy.model.get('config_hash')}/{policy.model.get('weights_digest')}), not "
                                f"this one {here['name']!r} ({here['config_hash']}/{here['weights_digest']})")
  w_bits, a_bits = list(policy.w_bits), list(policy.a_bits)

  def after_layer(l, layer_p):
    run = packed.compress_layers(layer_p, [w_bits[l]], [a_bits[l]], storage="fake",
                                 group_size=policy.group_size)
    return layer_p, (run[0] if isinstance(run, list) else run)

  pruned = prune.prune_layers(params, model_cfg, calib_tokens, policy.sparsity, policy.method, policy.nm,
                              block_size=policy.block_size, damp=policy.damp, after_layer=after_layer,
                              progress=progress)
  layers = packed.compress_layers(pruned["layers"], w_bits, a_bits, storage=policy.storage,
                                  group_size=policy.group_size)
  return {**pruned, "layers": layers}


def measure_memory_point(params: dict[str, Any], cfg: ModelConfig, eval_tokens: np.ndarray,
                         policy: CompressionPolicy | None = None) -> dict[str, Any]:
  """Perplexity of a (compressed) model on eval tokens [B, T] beside its memory: resident parameter bytes
  (all, and decoder layers only), the byte model's figure for `policy`, and the measured zero fraction of the
  layer projections."""
  from lacax.compress import calibrate  # pylint: disable=g-import-not-at-top
  from lacax.eval import perplexity  # pylint: disable=g-import-not-at-top

  nll = perplexity.teacher_forced_nll(params, cfg, np.asarray(eval_tokens, np.int32))
  zeros = total = 0
  for seg in (params["layers"] if isinstance(params["layers"], list) else [params["layers"]]):
    for name in calibrate.PROJECTIONS:
      w = seg[name]
      dense = w.dense() if hasattr(w, "dense") else w
      zeros += int(jax.numpy.sum(dense == 0))
      total += int(np.prod(dense.shape))
  out = {"perplexity": float(np.exp(np.mean(nll))), "nll": float(np.mean(nll)),
         "resident_bytes": packed.param_bytes(params), "layer_resident_bytes": packed.layer_param_bytes(params),
         "zero_fraction": zeros / max(total, 1)}
  if policy is not None:
    out["modelled_bytes"] = policy_bytes(policy, cfg)
    out.update(policy.summary())
  return out
