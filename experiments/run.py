"""The lacax experiment launcher.

  python -m experiments.run --config=configs/lacache.py [--config.cache.size=512 ...]

The config's `experiment` field names the job in `lacax.jobs`; results go to
`<results_dir>/<experiment>/<timestamp>/` (config.json, results.json, plots).

Scale-out (`lacax.sharding`): a config's `mesh` section (`--config.mesh.shape="(1,8,1)"`, `--config.mesh.rules=...`)
puts the job on a device mesh: the model loads straight into its shards, caches and batches are laid out by the
rules. On several hosts (a TPU pod slice; detected from the environment, or forced with `--multihost`) every
process runs this same command: `jax.distributed.initialize()` comes first, all processes run the job (they
compute together), and only process 0 logs, prints and writes the run directory. Orbax checkpoints are
collective saves (every process calls them, orbax writes each array once), so jobs call them on all processes.
"""

import contextlib
import importlib
import logging as std_logging
import os
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from lacax import results as results_lib
from lacax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).",
                                          lock_config=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None, "Call jax.distributed.initialize() before anything else. Default: detected from the "
    "environment (JAX_COORDINATOR_ADDRESS, TPU pod slices, SLURM, Open MPI); --nomultihost disables it.")


@contextlib.contextmanager
def _worker_silence(primary: bool):
  """On processes other than 0: no stdout, no progress bars, only absl errors."""
  if primary:
    yield
    return
  logging.set_verbosity(logging.ERROR)
  std_logging.getLogger().setLevel(std_logging.ERROR)  # the jobs log through the standard library too
  os.environ["TQDM_DISABLE"] = "1"
  with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
    yield


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<experiment>.py is required")
  multihost = sharding.initialize_multihost(_MULTIHOST.value)  # before anything touches the devices
  primary = sharding.is_primary_process()
  mesh_rules = sharding.mesh_rules_from_config(config.get("mesh"))
  job = importlib.import_module(f"lacax.jobs.{config.experiment}")
  if primary:
    run_dir = results_lib.new_run_dir(config.results_dir, config.experiment)
    results_lib.write_json(os.path.join(run_dir, "config.json"), config.to_dict())
  else:  # the job's own files (plots) go to a scratch directory that nobody reads
    run_dir = tempfile.mkdtemp(prefix=f"lacax_{config.experiment}_process{jax.process_index()}_")
  with _worker_silence(primary), sharding.use_mesh_rules(mesh_rules):
    if mesh_rules is not None:
      logging.info("mesh %s over %d devices in %d process(es); rules %s", dict(mesh_rules.axis_sizes),
                   jax.device_count(), jax.process_count(), dict(mesh_rules.rules))
    out = job.run(config, run_dir)
  out.update(results_lib.provenance(out.pop("model_fingerprint", None)))
  out["devices"] = {"count": jax.device_count(), "processes": jax.process_count(), "multihost": multihost,
                    "mesh": dict(mesh_rules.axis_sizes) if mesh_rules is not None else None}
  if primary:
    results_lib.write_json(os.path.join(run_dir, "results.json"), out)
    logging.info("results written to %s", run_dir)
    print(f"results: {run_dir}")


if __name__ == "__main__":
  app.run(main)
