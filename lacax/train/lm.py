"""Causal-LM fine-tuning set-ups for the loop: full fine-tuning and LoRA over a loaded Llama-family model.

`lm_setup(model, mode=..., ...)` returns an `LMSetup`: the parameter pytree to train, its labels, the loss
(`lacax.train.losses.llama_loss_fn`) and `export(state, directory)`, which writes the result. The finetune job
and `experiments/bench_train.py` both build their runs from it.

* full: the model's parameter pytree; `trainable` patterns and `layer_window` select what trains.
* lora: {"base": the model's parameters (frozen), "lora": adapters (trainable)}, the adapters of
  `lacax.model.lora` applied by the forward's LoRA option.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from lacax.train import losses
from lacax.train import state as st


@dataclasses.dataclass(frozen=True)
class LMSetup:
  """What a causal-LM run trains.

  Attributes:
    params: the parameter pytree `create_train_state` receives.
    labels: its labels (`lacax.train.state.make_labels`).
    loss_fn: the loss of the `lacax.train.loop` contract.
    export: (state, directory) -> {name: path} of what it wrote.
    cfg: the model config the loss runs (its dtype = the compute dtype).
  """

  params: Any
  labels: Any
  loss_fn: Callable
  export: Callable[[Any, str], dict[str, str]]
  cfg: Any


def _save(directory: str, params: Any, cfg: Any) -> str:
  from lacax.weights import checkpoint as params_ckpt  # pylint: disable=g-import-not-at-top

  return params_ckpt.save_params(directory, params, cfg, overwrite=True)


def full_setup(model: Any, *, compute_dtype: str = "", trainable: Any = "all",
               layer_window: tuple[int, int] | None = None) -> LMSetup:
  """Full fine-tuning of `model` (a `lacax.weights.loader.Model`)."""
  params = model.params
  labels = st.make_labels(params, trainable, layer_window=layer_window)
  cfg = model.cfg.replace(dtype=compute_dtype or model.cfg.dtype)

  def export(state, directory):
    return {"params": _save(os.path.join(directory, "params"), state.params, model.cfg)}

  return LMSetup(params, labels, losses.llama_loss_fn(cfg), export, cfg)
