"""Orbax save/restore of parameter pytrees (and the model config beside them).

Orbax writes into a temporary directory and renames it into place when the save is finalised, so an
interrupted save never leaves a half-written checkpoint under the final name. Restoring against abstract
targets (`jax.ShapeDtypeStruct`s with shardings) places every array straight into its shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from lacax.model import llama
from lacax.model.config import ModelConfig, RopeScaling

_CONFIG_FILE = "lacax_model_config.json"


def save_params(directory: str, params: Any, cfg: ModelConfig | None = None, *, overwrite: bool = False) -> str:
  """Saves `params` (and `cfg`) to `directory` (created; must not exist unless overwrite=True)."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"checkpoint directory {directory!r} exists; pass overwrite=True to replace it")
  metadata = {"model_config": dataclasses.asdict(cfg)} if cfg is not None else None
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, params, force=overwrite, custom_metadata=metadata)
    checkpointer.wait_until_finished()
  if cfg is not None:
    with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(cfg), f, indent=1)
  return directory


def load_config(directory: str) -> ModelConfig:
  """The `ModelConfig` saved beside a checkpoint."""
  path = os.path.join(directory, _CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {_CONFIG_FILE} in checkpoint directory {directory!r} (saved without a config?)")
  with open(path) as f:
    fields = json.load(f)
  if fields.get("rope_scaling"):
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
  return ModelConfig(**fields)


def restore_params(directory: str, cfg: ModelConfig | None = None, *, target: Any = None) -> Any:
  """Restores parameters saved by `save_params`.

  Args:
    directory: the checkpoint directory.
    cfg: the model config; default the one saved beside the checkpoint. Shapes are checked against it.
    target: optional abstract pytree (`jax.ShapeDtypeStruct`s, possibly with `sharding`) to restore into.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  if target is None:
    cfg = cfg or load_config(directory)
    target = llama.param_shapes(cfg)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(directory, target)
