"""Where experiments write what they measured: `results/<experiment>/<timestamp>/`, and their provenance.

Every run directory holds `config.json` (the full config), `status.json`, the finished units of work,
`results.json` (every figure, plus the lacax version, the git commit and the model fingerprint), and whatever
plots the job makes: see `lacax.runs` (the run directory, units and resume) and `lacax.io` (atomic writes,
standard JSON). Benchmarks write one timestamped JSON file (`timestamped_path`) and measure each case in its own
process (`measure_in_subprocess`).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import lacax
from lacax import io as lacax_io


def git_commit() -> str | None:
  """The commit of the lacax checkout, or None outside a git checkout."""
  here = os.path.dirname(os.path.abspath(lacax.__file__))
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                         check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() + ("-dirty" if dirty else "")


def write_json(path: str, data: Any) -> None:
  """Writes standard JSON atomically (write + fsync + rename; non-finite floats encoded, see `lacax.io`)."""
  lacax_io.write_json(path, data)


def new_run_dir(root: str, experiment: str) -> str:
  """Creates `root/experiment/<UTC timestamp>/` and returns it (`lacax.runs.RunDir.create`)."""
  from lacax import runs  # pylint: disable=g-import-not-at-top

  return runs.RunDir.create(root, experiment).path


def timestamped_path(directory: str, suffix: str = ".json") -> str:
  """`directory/<UTC timestamp><suffix>` (the directory created): where a benchmark writes its record."""
  os.makedirs(directory, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  return os.path.join(directory, stamp + suffix)


def cpu_model() -> str:
  """The CPU's model name (`/proc/cpuinfo`), recorded by every benchmark: machines differ between sessions."""
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
  except OSError:
    return "unknown"


def provenance(model_fingerprint: str | None = None) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  return {"lacax_version": lacax.__version__, "git_commit": git_commit(), "jax_version": jax.__version__,
          "backend": jax.default_backend(), "model_fingerprint": model_fingerprint,
          "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def measure_in_subprocess(module: str, worker: str, flags: Sequence[str], *, prefix: str = "lacax_bench_",
                          env: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Runs `python -m module --worker=<worker>:<json path> *flags` in a fresh process (so one measurement's
  compiled programs, allocator state and peak RSS never leak into the next) and returns the JSON the worker
  wrote there, with `process_s` added; or {"error": the end of its stderr, "returncode"} if it failed.
  `env`: the worker's environment (default this process's)."""
  out = os.path.join(tempfile.mkdtemp(prefix=prefix), "case.json")
  cmd = [sys.executable, "-m", module, f"--worker={worker}:{out}", *flags]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=None if env is None else dict(env))
  if proc.returncode != 0 or not os.path.exists(out):
    return {"error": proc.stderr[-3000:], "returncode": proc.returncode}
  with open(out) as f:
    result = json.load(f)
  result["process_s"] = time.perf_counter() - start
  return result
