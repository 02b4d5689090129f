"""Experiment jobs: each is `run(config, run_dir) -> dict of results`, driven by `experiments/run.py`."""

from __future__ import annotations

from typing import Any


def model_from_config(config: Any):
  """The model of a job's config: `config.model.path` (None = the embedded default) in `config.model.dtype`.

  With a `config.mesh` section of more than one device, the parameters are loaded straight into the shards
  of its rules (`lacax.sharding.mesh_rules_from_config`), and the returned `Model.mesh_rules` carries them to
  whatever the job builds next (caches, generation, training); there is no implicit mesh context.
  """
  from lacax import sharding  # pylint: disable=g-import-not-at-top
  from lacax.weights.loader import load_model  # pylint: disable=g-import-not-at-top

  mesh_rules = sharding.mesh_rules_from_config(config.get("mesh"))
  return load_model(config.model.path or None, dtype=config.model.get("dtype", "float32"), mesh_rules=mesh_rules)
