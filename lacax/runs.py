"""Run directories that keep what they computed: finished units, status, resume.

A run directory (`<results_dir>/<experiment>/<UTC timestamp>/`) holds

  config.json     the full config the run was started with;
  status.json     {"state": "running" | "failed" | "done", "pid", "host", "started", "updated", "error"}:
                  a failed run says why (the exception, SIGINT, SIGTERM, a full disk), and a run killed with
                  SIGKILL still says "running" but with a pid that no longer exists (`RunDir.status()` reports
                  `"alive": False` for it);
  units/*.json    one file per finished unit of work (a policy's streaming result, a passkey / NIAH cell, a
                  LongBench task x policy, an ACT head evaluation), each written atomically as it finishes;
  results.json    rebuilt from the units when the job ends (standard JSON; see `lacax.io`);
  plots, predictions and other files the job writes.

The same command with `--config.resume=<run dir>` (or `--config.resume=latest`) opens the directory again: the
job skips every unit already there and computes the rest, so the final results equal those of an uninterrupted
run. A resumed run must have the same config (`check_config` lists the fields that differ).

Jobs use `RunDir.unit(key, compute)`: the stored value when `key` is finished, else `compute()` stored
atomically. A disk that fills up fails the write of the current unit only; every earlier unit stays.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import socket
import traceback
from typing import Any, Callable, Iterable, Mapping

from lacax import io
from lacax.errors import RunError

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
RESULTS_FILE = "results.json"
UNITS_DIR = "units"
STATES = ("running", "failed", "done")
IGNORED_ON_RESUME = ("resume",)
"""Config fields a resumed run may change."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunDir:
  """A run directory: units, status, config and results (see the module docstring).

  Args:
    path: the directory (created with its `units/` folder if missing).
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    os.makedirs(os.path.join(self.path, UNITS_DIR), exist_ok=True)

  def __fspath__(self) -> str:
    return self.path

  def __repr__(self) -> str:
    return f"RunDir({self.path!r})"

  # --- creating and finding runs -------------------------------------------------------------------------------

  @classmethod
  def create(cls, root: str, experiment: str) -> "RunDir":
    """A new `root/experiment/<UTC timestamp>/`."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    path = os.path.join(root, experiment, stamp)
    os.makedirs(path, exist_ok=False)
    return cls(path)

  @classmethod
  def find(cls, spec: str, root: str, experiment: str) -> "RunDir":
    """The run to resume: a run directory path, or "latest" (the newest run of `experiment` under `root`).

    Raises:
      RunError: no such run, or the directory is not a run directory (no config.json).
    """
    if spec == "latest":
      parent = os.path.join(root, experiment)
      runs = sorted(d for d in os.listdir(parent) if os.path.isfile(os.path.join(parent, d, CONFIG_FILE))) \
          if os.path.isdir(parent) else []
      if not runs:
        raise RunError(f"resume='latest': no run of {experiment!r} under {parent!r} to resume")
      path = os.path.join(parent, runs[-1])
    else:
      path = spec
    if not os.path.isdir(path):
      raise RunError(f"resume={spec!r}: {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
      raise RunError(f"resume={spec!r}: {path!r} has no {CONFIG_FILE}; it is not a lacax run directory")
    return cls(path)

  def file(self, *parts: str) -> str:
    """The path of a file in the run directory (its parent folders created)."""
    path = os.path.join(self.path, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  # --- config ----------------------------------------------------------------------------------------------------

  def write_config(self, config: Mapping[str, Any]) -> None:
    io.write_json(os.path.join(self.path, CONFIG_FILE), dict(config))

  def check_config(self, config: Mapping[str, Any]) -> list[str]:
    """The fields (dotted names) whose values differ between `config` and the saved config.json."""
    saved = io.read_json(os.path.join(self.path, CONFIG_FILE))
    now = io.to_jsonable(dict(config))
    differences: list[str] = []

    def compare(a: Any, b: Any, where: str) -> None:
      if where in IGNORED_ON_RESUME:
        return
      if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
          compare(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{where}.{key}" if where else key)
      elif a != b:
        differences.append(f"{where}: saved {a!r}, now {b!r}")

    compare(saved, now, "")
    return differences

  # --- units -----------------------------------------------------------------------------------------------------

  def _unit_path(self, key: str) -> str:
    if not key:
      raise ValueError("a unit key must be a non-empty string")
    name = _UNSAFE.sub("_", key)
    if len(name) > 120 or name != key:  # keep file names short and distinct keys in distinct files
      name = name[:100] + "-" + hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(self.path, UNITS_DIR, name + ".json")

  def load_unit(self, key: str) -> Any | None:
    """The stored value of unit `key`, or None when it is not finished (a corrupt unit file counts as not
    finished: it is logged and recomputed)."""
    path = self._unit_path(key)
    if not os.path.isfile(path):
      return None
    try:
      record = io.read_json(path)
    except (OSError, ValueError) as e:
      logging.warning("unit %r in %s is unreadable (%s); recomputing it", key, self.path, e)
      return None
    if not isinstance(record, dict) or record.get("key") != key or "value" not in record:
      logging.warning("unit file %s does not hold unit %r; recomputing it", path, key)
      return None
    return io.decode_nonfinite(record["value"])

  def save_unit(self, key: str, value: Any) -> None:
    """Stores unit `key` atomically (write + fsync + rename)."""
    io.write_json(self._unit_path(key), {"key": key, "finished": _now(), "value": value}, tagged=True)

  def has_unit(self, key: str) -> bool:
    return self.load_unit(key) is not None

  def unit(self, key: str, compute: Callable[[], Any]) -> Any:
    """The value of unit `key`: stored, or `compute()` then stored. The returned value is the one read back
    from JSON in both cases (lists, not tuples or arrays), so a resumed run sees exactly what a fresh one does."""
    value = self.load_unit(key)
    if value is not None:
      logging.info("unit %r: finished in an earlier run, skipped", key)
      return value
    self.save_unit(key, compute())
    value = self.load_unit(key)
    if value is None:  # compute() returned None or the file cannot be read back
      raise RunError(f"unit {key!r} could not be read back from {self._unit_path(key)!r}")
    return value

  def finished_units(self) -> list[str]:
    """Keys of the finished units."""
    keys = []
    folder = os.path.join(self.path, UNITS_DIR)
    for name in sorted(os.listdir(folder)):
      if name.endswith(".json") and not name.startswith("."):
        try:
          keys.append(io.read_json(os.path.join(folder, name))["key"])
        except (OSError, ValueError, KeyError, TypeError):
          continue
    return keys

  # --- status and results ------------------------------------------------------------------------------------------

  def set_status(self, state: str, *, error: BaseException | str | None = None, **extra: Any) -> None:
    """Records the run's state. Best effort: a status that cannot be written (full disk) is logged."""
    if state not in STATES:
      raise ValueError(f"state={state!r} must be one of {STATES}")
    previous = self.status() or {}
    status = {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
              "started": previous.get("started") if state != "running" else _now(), "updated": _now(),
              "resumed": previous.get("resumed", 0) + (1 if state == "running" and previous else 0),
              "finished_units": len(self.finished_units()), **extra}
    if isinstance(error, BaseException):
      status["error"] = f"{type(error).__name__}: {error}"
      status["traceback"] = "".join(traceback.format_exception(error))[-4000:]
    elif error is not None:
      status["error"] = error
    try:
      io.write_json(os.path.join(self.path, STATUS_FILE), status)
    except OSError as e:
      logging.error("could not write %s (%s); the run's state is %s", STATUS_FILE, e, state)

  def status(self) -> dict[str, Any] | None:
    """The recorded status, with "alive" (False for a "running" run whose process is gone on this host)."""
    path = os.path.join(self.path, STATUS_FILE)
    if not os.path.isfile(path):
      return None
    try:
      status = io.read_json(path)
    except (OSError, ValueError):
      return None
    if status.get("state") == "running" and status.get("host") == socket.gethostname():
      status["alive"] = _pid_alive(int(status.get("pid", -1)))
    return status

  def write_results(self, results: Mapping[str, Any]) -> list[str]:
    """Writes results.json (standard JSON, atomic). Non-finite numbers are written as "NaN" / "Infinity" and
    listed under "nonfinite" (and returned), so no reader takes them for real figures."""
    nonfinite: list[str] = []
    document = io.to_jsonable(dict(results), nonfinite=nonfinite)
    if nonfinite:
      document["nonfinite"] = nonfinite
      logging.error("results hold non-finite values at %s", ", ".join(nonfinite[:10]))
    io.write_json(os.path.join(self.path, RESULTS_FILE), document)
    return nonfinite


def as_run_dir(run_dir: str | os.PathLike[str] | RunDir) -> RunDir:
  """A `RunDir` for what a job was handed (the launcher passes one; tests may pass a plain path)."""
  return run_dir if isinstance(run_dir, RunDir) else RunDir(os.fspath(run_dir))


def safe_plot(name: str, plot: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
  """`plot(*args, **kwargs)`, with a failure logged instead of raised: a plot never costs the results.

  Returns:
    None, or the error message (jobs record it in their results).
  """
  try:
    plot(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    logging.error("plot %s failed (%s: %s); the results are unaffected", name, type(e).__name__, e)
    return f"{type(e).__name__}: {e}"
  return None


def keys_done(run_dir: RunDir, keys: Iterable[str]) -> list[str]:
  """The keys among `keys` whose units are finished."""
  return [k for k in keys if run_dir.has_unit(k)]
