"""Orbax save/restore of parameter pytrees (and the model config beside them), never losing the previous one.

A save writes the whole new checkpoint into a sibling directory (`.<name>.saving-<pid>`), records a manifest
(`lacax_checkpoint.json`: every file with its size, and the SHA-256 of the small metadata files), and only then
puts it in place: a new directory is renamed in; an existing one is swapped with the new one atomically
(`renameat2(RENAME_EXCHANGE)` on Linux), and the old copy is removed afterwards. A process killed at any moment
therefore leaves at `directory` either the old checkpoint or the new one, complete; leftovers of an interrupted
save are siblings that the next save removes. Where the exchange is not available (non-Linux), the old
checkpoint is first renamed to `.<name>.previous`, which `restore_params` falls back to if the kill came between
the two renames.

Restoring verifies the manifest first, so a truncated or missing part is reported as a `CheckpointError` naming
the directory and the part, not as an orbax traceback. Restoring against abstract targets
(`jax.ShapeDtypeStruct`s with shardings) places every array straight into its shards.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from lacax import io as lacax_io
from lacax.errors import CheckpointError, DataError
from lacax.model import llama
from lacax.model.config import ModelConfig, RopeScaling

_CONFIG_FILE = "lacax_model_config.json"
_MANIFEST_FILE = "lacax_checkpoint.json"
_HASHED_BYTES = 1 << 20  # files up to this size get a checksum (orbax metadata); larger ones a size check
_RENAME_EXCHANGE = 2
# Per-layer arrays a model may carry beyond `llama.param_shapes` (output biases, `lacax.model.llama`).
_OPTIONAL_LAYER_ARRAYS = ("bo", "b_down")


def _sibling(directory: str, tag: str) -> str:
  parent, name = os.path.split(directory)
  return os.path.join(parent, f".{name}.{tag}")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _manifest(directory: str) -> dict[str, Any]:
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel == _MANIFEST_FILE:
        continue
      size = os.path.getsize(path)
      files[rel] = {"size": size, **({"sha256": _sha256(path)} if size <= _HASHED_BYTES else {})}
  return {"format": 1, "files": files}


def verify(directory: str) -> None:
  """Checks a checkpoint directory against its manifest (if it has one).

  Raises:
    CheckpointError: naming the directory and the part that is missing, truncated or corrupt.
  """
  path = os.path.join(directory, _MANIFEST_FILE)
  if not os.path.isfile(path):
    return  # saved before manifests existed
  try:
    manifest = lacax_io.read_json(path, what="checkpoint manifest")
    files = manifest["files"]
  except (DataError, KeyError, TypeError) as e:
    raise CheckpointError(f"the manifest {_MANIFEST_FILE} is unreadable ({e})", path=directory) from None
  for rel, expected in sorted(files.items()):
    part = os.path.join(directory, rel)
    if not os.path.isfile(part):
      raise CheckpointError(f"part {rel!r} is missing", path=directory)
    size = os.path.getsize(part)
    if size != expected["size"]:
      raise CheckpointError(f"part {rel!r} is truncated or corrupt: {size} bytes, {expected['size']} saved",
                            path=directory)
    if "sha256" in expected and _sha256(part) != expected["sha256"]:
      raise CheckpointError(f"part {rel!r} is corrupt (its SHA-256 differs from the one saved)", path=directory)


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  at_fdcwd = -100
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  logging.warning("renameat2(RENAME_EXCHANGE) failed (%s); swapping with two renames",
                  os.strerror(ctypes.get_errno()))
  return False


def _remove_leftovers(directory: str) -> None:
  parent, name = os.path.split(directory)
  for entry in os.listdir(parent or "."):
    if entry.startswith(f".{name}.saving-") or entry.startswith(f".{name}.replaced-"):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _put_in_place(new: str, directory: str) -> None:
  """Moves the complete checkpoint `new` to `directory`, replacing what is there without a moment where neither
  the old nor the new one is restorable there."""
  if not os.path.exists(directory):
    os.replace(new, directory)
    return
  if _exchange(new, directory):  # `new` now holds the old checkpoint
    shutil.rmtree(new, ignore_errors=True)
    return
  previous = _sibling(directory, "previous")
  shutil.rmtree(previous, ignore_errors=True)
  os.replace(directory, previous)  # restore_params falls back to `previous` until the next line is done
  os.replace(new, directory)
  shutil.rmtree(previous, ignore_errors=True)


def save_params(directory: str, params: Any, cfg: ModelConfig | None = None, *, overwrite: bool = False,
                write_extra: Callable[[str], None] | None = None) -> str:
  """Saves `params` (and `cfg`) to `directory`.

  Args:
    directory: created; must not exist unless `overwrite`.
    params: the parameter pytree.
    cfg: the model config, saved beside (so `restore_params(directory)` needs nothing else).
    overwrite: replace an existing checkpoint; the old one stays restorable until the new one is complete.
    write_extra: called with the staging directory before the manifest is recorded, to write more files beside
      the parameters (e.g. a tokenizer, metadata); they are put in place and verified with the checkpoint.

  Returns:
    The absolute directory.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"checkpoint directory {directory!r} exists; pass overwrite=True to replace it")
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  _remove_leftovers(directory)
  staging = _sibling(directory, f"saving-{os.getpid()}")
  metadata = {"model_config": dataclasses.asdict(cfg)} if cfg is not None else None
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(staging, params, custom_metadata=metadata)
      checkpointer.wait_until_finished()
    if cfg is not None:
      lacax_io.write_json(os.path.join(staging, _CONFIG_FILE), dataclasses.asdict(cfg))
    if write_extra is not None:
      write_extra(staging)
    lacax_io.write_json(os.path.join(staging, _MANIFEST_FILE), _manifest(staging))
    _put_in_place(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def load_config(directory: str) -> ModelConfig:
  """The `ModelConfig` saved beside a checkpoint."""
  path = os.path.join(directory, _CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {_CONFIG_FILE} in checkpoint directory {directory!r} (saved without a config?)")
  fields = lacax_io.read_json(path, what="model config")
  try:
    if fields.get("rope_scaling"):
      fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)
  except (TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f"part {_CONFIG_FILE!r} does not describe a model config ({e})", path=directory) from None


def _resolve(directory: str) -> str:
  """`directory`, or the previous checkpoint a two-rename swap left beside it when killed half-way."""
  if os.path.isdir(directory):
    return directory
  previous = _sibling(directory, "previous")
  if os.path.isdir(previous):
    logging.warning("checkpoint %s is missing but %s (the checkpoint it was replacing) is complete; restoring it",
                    directory, previous)
    return previous
  raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")


def param_target(directory: str, cfg: ModelConfig) -> Any:
  """`llama.param_shapes(cfg)` plus the optional layer arrays the checkpoint holds beyond it (the output biases
  `bo` / `b_down` of a sliced or bias-compensated model), in `cfg`'s dtype: the abstract tree to restore."""
  target = llama.param_shapes(cfg)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      saved = checkpointer.metadata(_resolve(os.path.abspath(directory))).item_metadata.tree
  except (ValueError, KeyError, OSError, AttributeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"orbax cannot read its metadata ({type(e).__name__}: {str(e)[:500]})",
                          path=directory) from None
  saved_layers = saved.get("layers") if isinstance(saved, dict) else None
  if saved_layers is None:
    return target
  segments = list(target["layers"]) if isinstance(target["layers"], list) else [target["layers"]]
  saved_segments = list(saved_layers) if isinstance(saved_layers, (list, tuple)) else [saved_layers]
  if len(saved_segments) != len(segments):
    raise CheckpointError(f"it holds {len(saved_segments)} layer segment(s); ModelConfig.layer_shapes declares "
                          f"{len(segments)}", path=directory)
  dt = cfg.jnp_dtype
  out = []
  for seg, saved_seg in zip(segments, saved_segments):
    extra = {k: jax.ShapeDtypeStruct(tuple(m.shape), dt) for k, m in saved_seg.items()
             if k not in seg and k in _OPTIONAL_LAYER_ARRAYS}
    out.append({**seg, **extra})
  return {**target, "layers": out if isinstance(target["layers"], list) else out[0]}


def restore_params(directory: str, cfg: ModelConfig | None = None, *, target: Any = None) -> Any:
  """Restores parameters saved by `save_params`.

  Args:
    directory: the checkpoint directory.
    cfg: the model config; default the one saved beside the checkpoint. Shapes are checked against it.
    target: optional abstract pytree (`jax.ShapeDtypeStruct`s, possibly with `sharding`) to restore into.

  Raises:
    FileNotFoundError: no checkpoint at `directory`.
    CheckpointError: a part is missing, truncated or corrupt, or orbax cannot read it (the message names the
      directory and the part).
  """
  directory = _resolve(os.path.abspath(directory))
  verify(directory)
  if target is None:
    cfg = cfg or load_config(directory)
    target = param_target(directory, cfg)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(directory, target)
  except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"orbax cannot restore it ({type(e).__name__}: {str(e)[:500]})", path=directory) from None
