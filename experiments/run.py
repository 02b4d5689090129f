"""The lacax experiment launcher.

  python -m experiments.run --config=configs/lacache.py [--config.cache.size=512 ...]

The config's `experiment` field names the job in `lacax.jobs`; results go to
`<results_dir>/<experiment>/<timestamp>/` (config.json, results.json, plots).
"""

import importlib
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lacax import results as results_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<experiment>.py is required")
  job = importlib.import_module(f"lacax.jobs.{config.experiment}")
  run_dir = results_lib.new_run_dir(config.results_dir, config.experiment)
  results_lib.write_json(os.path.join(run_dir, "config.json"), config.to_dict())
  out = job.run(config, run_dir)
  out.update(results_lib.provenance(out.pop("model_fingerprint", None)))
  results_lib.write_json(os.path.join(run_dir, "results.json"), out)
  logging.info("results written to %s", run_dir)
  print(f"results: {run_dir}")


if __name__ == "__main__":
  app.run(main)
