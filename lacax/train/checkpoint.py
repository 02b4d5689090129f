"""Train-state checkpoints with orbax: atomic saves every N steps, the last K kept, checked resumes.

Layout: `<directory>/<step>/state` (the arrays, orbax `StandardSave`) and `<directory>/<step>/meta` (JSON: the
path, shape and dtype of every saved leaf and the run's flattened config). Orbax writes each step into a
temporary directory and renames it when the save is complete, so a run killed mid-save (SIGKILL) leaves the
previous checkpoint as the latest one and never a half-written one under a step name.

The state is saved as a flat mapping of its leaves (step, trainable parameters, optimizer state, PRNG key and,
when asked, the frozen parameters), so any optax state and any parameter pytree round-trip. `restore` checks
the saved leaves against the current state before reading a byte: a config that changes a shape is refused, the
message naming the config fields that differ from the saved run (and the first leaf whose shape changed). A
checkpoint that cannot be read (files missing or truncated) raises `CheckpointError` naming its directory.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lacax.train.state import TrainState, path_str


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be restored (corrupted, incomplete, or from an incompatible run)."""


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
  """{"model.hidden_size": 64, ...} from a nested ConfigDict / mapping (values made JSON-safe)."""
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}
  for key, value in dict(config).items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      out.update(flatten_config(value, name + "."))
    else:
      out[name] = json.loads(json.dumps(value, default=str))
  return out


def _saved_part(state: TrainState, save_frozen: bool) -> dict[str, Any]:
  part = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng}
  if save_frozen:
    part["frozen"] = state.frozen
  return part


def _leaves(state: TrainState, save_frozen: bool) -> tuple[list[str], list[Any], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(_saved_part(state, save_frozen))
  return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


class Checkpointer:
  """Saves and restores `TrainState`s under one directory (one subdirectory per step).

  Args:
    directory: where the checkpoints live (created).
    keep: how many of the latest checkpoints to keep (older ones are deleted after a save).
    config: the run's config, recorded with every checkpoint and compared on restore.
    save_frozen: also save the frozen parameters (off by default: they are the base model, which the same
      command loads again; on when the frozen part is itself the product of training).
    async_save: let orbax write in a background thread (the next save, `wait` and `close` wait for it).
  """

  def __init__(self, directory: str, *, keep: int = 3, config: Any = None, save_frozen: bool = False,
               async_save: bool = False):
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints={keep} must be >= 1")
    self.directory = os.path.abspath(directory)
    self.save_frozen = save_frozen
    self.config = flatten_config(config)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, state: TrainState, extra: Mapping[str, Any] | None = None) -> int:
    """Saves `state` under its step (a no-op if that step is saved already); returns the step."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return step
    names, leaves, _ = _leaves(state, self.save_frozen)
    arrays = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
    meta = {"paths": names, "shapes": [list(np.shape(x)) for x in leaves],
            "dtypes": [str(np.dtype(x.dtype)) for x in leaves], "config": self.config, "save_frozen": self.save_frozen,
            "extra": dict(extra or {})}
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                    meta=ocp.args.JsonSave(meta)))
    return step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def read_meta(self, step: int) -> dict[str, Any]:
    path = os.path.join(self.step_dir(step), "meta")
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {self.step_dir(step)} is corrupted or incomplete: its metadata ({path}) "
                            f"cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or not {"paths", "shapes", "dtypes"} <= set(meta):
      raise CheckpointError(f"checkpoint {self.step_dir(step)} is corrupted: {path} lacks paths/shapes/dtypes")
    return meta

  def _check_compatible(self, step: int, meta: Mapping[str, Any], names: list[str], leaves: list[Any]) -> None:
    saved = list(zip(meta["paths"], map(tuple, meta["shapes"])))
    now = [(n, tuple(np.shape(x))) for n, x in zip(names, leaves)]
    if saved == now:
      return
    changed_fields = sorted(k for k in set(self.config) | set(meta.get("config", {}))
                            if self.config.get(k) != meta.get("config", {}).get(k))
    saved_map = dict(saved)
    changed = [(n, saved_map.get(n), shape) for n, shape in now if saved_map.get(n) != shape]
    changed.sort(key=lambda c: not c[0].startswith("trainable/"))  # a parameter says more than an optimizer moment
    first = changed[0] if changed else None
    if first is None:
      missing = sorted(set(saved_map) - {n for n, _ in now})
      first = (missing[0] if missing else "?", saved_map.get(missing[0]) if missing else None, None)
    fields = ", ".join(f"{k}: saved {meta.get('config', {}).get(k)!r}, now {self.config.get(k)!r}"
                       for k in changed_fields) or "no recorded config field differs"
    raise ValueError(f"cannot resume from {self.step_dir(step)}: the train state's shapes changed ({first[0]}: "
                     f"saved {first[1]}, now {first[2]}). Config fields that differ from the saved run: {fields}. "
                     "Use a new checkpoint directory for a run with other shapes.")

  def restore(self, state: TrainState, step: int | None = None) -> TrainState:
    """`state` with the saved leaves of checkpoint `step` (default the latest), laid out as `state`'s arrays.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the directory.
      ValueError: the saved shapes differ from `state`'s (names the config fields that changed).
      CheckpointError: the checkpoint is corrupted or incomplete (names its directory).
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}")
    meta = self.read_meta(step)
    save_frozen = bool(meta.get("save_frozen", False))
    names, leaves, treedef = _leaves(state, save_frozen)
    self._check_compatible(step, meta, names, leaves)
    changed = {k: (meta.get("config", {}).get(k), v) for k, v in self.config.items()
               if meta.get("config", {}).get(k) != v}
    if changed:
      logging.warning("resuming from %s with config changes (shapes unchanged): %s", self.step_dir(step), changed)
    target = {f"leaf_{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
              for i, x in enumerate(leaves)}
    try:
      arrays = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
      restored = [arrays[f"leaf_{i:05d}"] for i in range(len(leaves))]
      restored = [jax.block_until_ready(x) for x in restored]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint {self.step_dir(step)} is corrupted or incomplete and cannot be restored "
                            f"({type(e).__name__}: {str(e)[:500]}); delete that directory to resume from an "
                            "earlier checkpoint") from e
    part = jax.tree_util.tree_unflatten(treedef, restored)
    return state.replace(step=part["step"], trainable=part["trainable"], opt_state=part["opt_state"],
                         rng=part["rng"], frozen=part.get("frozen", state.frozen))
