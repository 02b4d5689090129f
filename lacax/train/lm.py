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

from lacax.model.config import dtype_of
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
    lora_config: the `lacax.model.lora.LoraConfig` of a LoRA run (None for full fine-tuning).
  """

  params: Any
  labels: Any
  loss_fn: Callable
  export: Callable[[Any, str], dict[str, str]]
  cfg: Any
  lora_config: Any = None


def _save(directory: str, params: Any, cfg: Any) -> str:
  from lacax.weights import checkpoint as params_ckpt  # pylint: disable=g-import-not-at-top

  return params_ckpt.save_params(directory, params, cfg, overwrite=True)


def check_precision(compute_dtype: str, activation_dtype: str = "") -> None:
  """Raises ValueError naming the field unless both are dtype names (`lacax.model.config.dtype_of`) or ''
  (jobs call this before loading the model)."""
  dtype_of(compute_dtype, "train.compute_dtype")
  dtype_of(activation_dtype, "train.activation_dtype")


def _precision(model: Any, compute_dtype: str, activation_dtype: str) -> tuple[Any, str | None]:
  """(the loss's model config, its projections' dot dtype) for a compute dtype.

  compute_dtype "bfloat16" (or "float16") is mixed precision inside the forward: every projection and the LM
  head multiply in it (float32 accumulation, `lacax.model.precision`), the master weights stay float32 and are
  cast where each layer uses them, and the residual stream, norms, attention softmax and loss stay in
  `activation_dtype` ("" = the model's dtype, float32). A bfloat16 residual stream (`activation_dtype`
  "bfloat16") halves activation memory on accelerators; on XLA:CPU it is slower (XLA computes bfloat16
  element-wise work and the layer scan's stacked residuals in float32, converting whole stacks per layer).
  """
  check_precision(compute_dtype, activation_dtype)
  cfg = model.cfg.replace(dtype=activation_dtype or model.cfg.dtype)
  return cfg, (compute_dtype or None)


def full_setup(model: Any, *, compute_dtype: str = "", trainable: Any = "all",
               layer_window: tuple[int, int] | None = None, activation_dtype: str = "") -> LMSetup:
  """Full fine-tuning of `model` (a `lacax.weights.loader.Model`); precision as in `_precision`."""
  params = model.params
  labels = st.make_labels(params, trainable, layer_window=layer_window)
  cfg, dot_dtype = _precision(model, compute_dtype, activation_dtype)

  def export(state, directory):
    return {"params": _save(os.path.join(directory, "params"), state.params, model.cfg)}

  return LMSetup(params, labels, losses.llama_loss_fn(cfg, dot_dtype=dot_dtype), export, cfg)


def lora_setup(model: Any, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] = ("q", "v"), seed: int = 0, compute_dtype: str = "",
               layer_window: tuple[int, int] | None = None, export_merged: bool = True,
               activation_dtype: str = "") -> LMSetup:
  """LoRA on `model`: the base weights frozen, adapters (`lacax.model.lora`) on `targets` trained.

  Args:
    rank, alpha, dropout: the adapters' rank r, scale numerator (scale alpha / r) and input dropout (training).
    targets: projections, by short name (q, k, v, o, gate, up, down) or lacax name (wq, ..., w_down).
    seed: seeds the adapters' A matrices (B starts at zero: the fresh model equals the base model).
    compute_dtype, activation_dtype: precision as in `_precision` ("" = the model's dtype; "bfloat16":
      bfloat16 projections over float32 weights and residual stream; the adapters' rank-r products stay in
      the residual stream's dtype).
    layer_window: (start, stop): adapters train only in those layers (the others stay zero, bit-identical).
    export_merged: `export` also writes the base weights with the adapters merged in.

  The parameter pytree is {"params": base weights, "lora": adapters}.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from lacax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top

  names = tuple(LORA_SHORT_NAMES.get(t, t) for t in targets)
  lcfg = lora_lib.LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=names)
  adapters = lora_lib.init_lora(lcfg, model.params, jax.random.PRNGKey(seed))
  params = {"params": model.params, "lora": adapters}
  # Adapters are stacked over layers on axis 0 like the base layers: a window selects their rows.
  labels = st.make_labels(params, ("^lora/",), layer_window=layer_window, layers_key="lora")
  cfg, dot_dtype = _precision(model, compute_dtype, activation_dtype)

  def forward_kwargs(trainable, frozen, rng):
    return {"options": lora_lib.options(lcfg, st.combine(trainable, frozen)["lora"], rng)}

  loss_fn = losses.llama_loss_fn(cfg, params_fn=lambda tr, fr: st.combine(tr, fr)["params"],
                                 forward_kwargs=forward_kwargs, dot_dtype=dot_dtype)

  def export(state, directory):
    p = state.params
    written = {"lora": _save(os.path.join(directory, "lora"), jax.device_get(p["lora"]), None)}
    if export_merged:
      merged = lora_lib.merge(p["params"], p["lora"], lcfg)
      written["merged"] = _save(os.path.join(directory, "merged"), merged, model.cfg)
    return written

  return LMSetup(params, labels, loss_fn, export, cfg, lcfg)


# Short projection names (config files, peft-like) -> lacax parameter names.
LORA_SHORT_NAMES = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}


def param_sharding(mesh_rules: Any) -> Callable[[Any], Any]:
  """params -> shardings for the loop's `param_sharding`: Llama weights (also under "params") by the mesh
  rules, anything else (adapters: a few MB) replicated."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  replicated = NamedSharding(mesh_rules.mesh, PartitionSpec())

  def shardings(tree):
    if isinstance(tree, dict) and "lora" in tree:
      import jax  # pylint: disable=g-import-not-at-top
      out = {k: jax.tree_util.tree_map(lambda _: replicated, v) for k, v in tree.items() if k != "params"}
      if tree.get("params") is not None:
        out["params"] = mesh_rules.param_shardings(tree["params"])
      return out
    return mesh_rules.param_shardings(tree)

  return shardings
