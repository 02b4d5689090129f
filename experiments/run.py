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

Reliability (`lacax.runs`): before anything is loaded the job's `validate(config)` checks every field,
data file and output path and reports all problems at once; a misspelled `--config.` field is one line with
the suggestion. The run's state (running / failed with the error / done) is kept in `status.json`; jobs write
each finished unit as it completes, so a run that was killed, interrupted or ran out of disk is finished by
the same command with `--config.resume=<run dir>` (or `--config.resume=latest`), skipping the finished units.

Memory: on Linux with glibc >= 2.35 and transparent huge pages in "madvise" mode, the launcher restarts itself
(same process id) with glibc's huge-page tunable (`lacax.memory.reexec_with_hugepages`): XLA:CPU allocates each
step's temporaries afresh, and with 4 KiB pages a SmolLM2 training step spends a fifth of its time in page
faults. `LACAX_HUGEPAGES=0` turns this off.
"""

import contextlib
import difflib
import importlib
import logging as std_logging
import os
import signal
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_file_parser

from lacax import errors
from lacax import memory
from lacax import results as results_lib
from lacax import runs
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


def _config_fields(config, prefix: str = "") -> list[str]:
  fields = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    fields.append(name)
    if hasattr(value, "items") and not isinstance(value, dict):
      fields.extend(_config_fields(value, name + "."))
  return fields


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config override mistakes as one line (the field, and the closest known one)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip() or type(e).__name__
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:  # the config as written, to list its fields
      config = config_file_parser.ConfigFileFlagParser("config").parse(config_file)
    except Exception:  # pylint: disable=broad-except
      config = None
    if config is not None:
      known = _config_fields(config)
      overrides = [a[2:].split("=", 1)[0][len("config."):] for a in argv[1:] if a.startswith("--config.")]
      unknown = [name for name in overrides if name not in known]
      if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
        message = f"--config.{unknown[0]} is not a field of {config_file}" + (
            f"; did you mean --config.{close[0]}?" if close else "")
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


class Terminated(BaseException):
  """SIGTERM, raised in the main thread so that the run's status records it."""


def _raise_terminated(signum, frame):
  del frame
  raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


def _validate(config, job) -> None:
  """Every problem of the config, data files and output path, in one `ValidationError`, before any loading."""
  problems = errors.Problems()
  if config.get("resume"):
    pass  # checked when the run directory is opened
  else:
    try:  # the run directory will be created here: prove that it can be
      os.makedirs(config.results_dir, exist_ok=True)
      with tempfile.TemporaryFile(dir=config.results_dir):
        pass
    except OSError as e:
      problems.add(f"results_dir={config.results_dir!r} cannot be written ({e.strerror or e})")
  validate = getattr(job, "validate", None) or getattr(job, "validate_config", None)
  if validate is not None:
    try:
      validate(config)
    except errors.ValidationError as e:
      problems.extend(e.problems)
    except (ValueError, FileNotFoundError) as e:
      problems.add(str(e))
  problems.raise_if_any(f"{config.experiment} config")


def _open_run_dir(config) -> runs.RunDir:
  resume = config.get("resume") or ""
  if not resume:
    run_dir = runs.RunDir.create(config.results_dir, config.experiment)
    run_dir.write_config(config.to_dict())
    return run_dir
  run_dir = runs.RunDir.find(resume, config.results_dir, config.experiment)
  differences = run_dir.check_config(config.to_dict())
  if differences:
    raise errors.RunError(f"resume={resume!r}: {run_dir.path} was run with a different config; differing "
                          "fields:\n  " + "\n  ".join(differences))
  status = run_dir.status() or {}
  if status.get("state") == "running" and status.get("alive"):
    raise errors.RunError(f"resume={resume!r}: {run_dir.path} is still running (pid {status.get('pid')})")
  logging.info("resuming %s (%s; %d finished units)", run_dir.path, status.get("state", "no status"),
               len(run_dir.finished_units()))
  return run_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # XLA:CPU allocates each step's temporaries afresh; huge pages save most of their page faults (lacax.memory).
  memory.reexec_with_hugepages(["-m", "experiments.run", *sys.argv[1:]])
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<experiment>.py is required")
  try:
    _run(config)
  except errors.LacaxError as e:  # a named, expected failure: one message, not a traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _run(config):
  job = importlib.import_module(f"lacax.jobs.{config.experiment}")
  _validate(config, job)  # before anything touches the devices or loads a model
  multihost = sharding.initialize_multihost(_MULTIHOST.value)
  primary = sharding.is_primary_process()
  mesh_rules = sharding.mesh_rules_from_config(config.get("mesh"))
  if primary:
    run_dir = _open_run_dir(config)
  else:  # the job's own files (plots) go to a scratch directory that nobody reads
    run_dir = runs.RunDir(tempfile.mkdtemp(prefix=f"lacax_{config.experiment}_process{jax.process_index()}_"))
  run_dir.set_status("running")
  previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    with _worker_silence(primary):
      if mesh_rules is not None:
        logging.info("mesh %s over %d devices in %d process(es); rules %s", dict(mesh_rules.axis_sizes),
                     jax.device_count(), jax.process_count(), dict(mesh_rules.rules))
      out = job.run(config, run_dir)
    out.update(results_lib.provenance(out.pop("model_fingerprint", None)))
    out["devices"] = {"count": jax.device_count(), "processes": jax.process_count(), "multihost": multihost,
                      "mesh": dict(mesh_rules.axis_sizes) if mesh_rules is not None else None}
    if primary:
      nonfinite = run_dir.write_results(out)
      run_dir.set_status("done", nonfinite=nonfinite)
      logging.info("results written to %s", run_dir.path)
      print(f"results: {run_dir.path}")
      if nonfinite:
        print(f"WARNING: non-finite values in the results: {', '.join(nonfinite[:10])}", file=sys.stderr)
  except BaseException as e:
    run_dir.set_status("failed", error=e if not isinstance(e, KeyboardInterrupt) else "interrupted (SIGINT)")
    if primary:
      print(f"run directory: {run_dir.path} (failed; finish it with --config.resume={run_dir.path})",
            file=sys.stderr)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
