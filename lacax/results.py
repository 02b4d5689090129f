"""Where experiments write what they measured: `results/<experiment>/<timestamp>/`.

Every run directory holds `config.json` (the full config), `results.json` (every figure, plus the lacax
version, the git commit and the model fingerprint), and whatever plots the job makes. Files are written to a
temporary name and renamed, so a crash never leaves a truncated results file.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from typing import Any

import lacax


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
  """Writes JSON atomically (temp file + rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)


def new_run_dir(root: str, experiment: str) -> str:
  """Creates `root/experiment/<UTC timestamp>/` and returns it."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
  path = os.path.join(root, experiment, stamp)
  os.makedirs(path, exist_ok=False)
  return path


def provenance(model_fingerprint: str | None = None) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  return {"lacax_version": lacax.__version__, "git_commit": git_commit(), "jax_version": jax.__version__,
          "backend": jax.default_backend(), "model_fingerprint": model_fingerprint,
          "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
