"""The errors lacax raises on bad input: one hierarchy, every message naming the file / field and the problem.

  LacaxError
  ├── ConfigError (ValueError)          a config field has a bad value; `ValidationError` lists every problem
  ├── FileFormatError (ValueError)      a file is unreadable as what it should be: `.path`, `.where` (a line,
  │   │                                 a byte offset or a part), `.problem`
  │   └── DataError                     a data / text / JSONL file (bad UTF-8, invalid JSON, a null field)
  ├── CheckpointError (ValueError)      model weights or a checkpoint (truncated, corrupt, mis-shaped tensor)
  ├── NonFiniteError (ArithmeticError)  a loss / perplexity came out NaN or infinite
  ├── ResourceError (MemoryError)       a request cannot fit (the message gives the bytes it needs)
  └── RunError                          a run directory cannot be resumed (missing, config differs, ...)

Each subclasses the builtin a caller would have caught before (ValueError, MemoryError, ...), so existing
`except ValueError` code keeps working.
"""

from __future__ import annotations

import os
from typing import Sequence


class LacaxError(Exception):
  """Base of every error lacax raises on purpose."""


class ConfigError(LacaxError, ValueError):
  """A config field has a value the code cannot use; the message names the field, the value and the constraint."""


class ValidationError(ConfigError):
  """Every problem found while checking a config before any work; `.problems` holds one message each."""

  def __init__(self, problems: Sequence[str], what: str = "the config"):
    self.problems = list(problems)
    if len(self.problems) == 1:
      message = f"{what}: {self.problems[0]}"
    else:
      message = f"{what} has {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(message)


class Problems:
  """Collects validation problems so that one error can list them all.

    problems = Problems()
    problems.check(n > 0, f"num_tokens={n!r} must be > 0")
    problems.raise_if_any("configs/lacache.py")
  """

  def __init__(self):
    self.messages: list[str] = []

  def add(self, message: str) -> None:
    self.messages.append(message)

  def check(self, condition: bool, message: str) -> bool:
    if not condition:
      self.add(message)
    return bool(condition)

  def extend(self, messages: Sequence[str]) -> None:
    self.messages.extend(messages)

  def __bool__(self) -> bool:
    return bool(self.messages)

  def raise_if_any(self, what: str = "the config") -> None:
    if self.messages:
      raise ValidationError(self.messages, what)


class FileFormatError(LacaxError, ValueError):
  """A file cannot be read as what it should be.

  Attributes:
    path: the file (or directory).
    problem: what is wrong.
    where: a line ("line 3"), a byte offset ("byte 1024"), a part ("item 'params'"), or None.
  """

  def __init__(self, path: str | os.PathLike[str], problem: str, where: str | None = None):
    self.path = os.fspath(path)
    self.problem = problem
    self.where = where
    super().__init__(f"{self.path}{', ' + where if where else ''}: {problem}")


class DataError(FileFormatError):
  """A data file (text, JSON, JSONL) is malformed: bad encoding, invalid JSON, a missing or null field."""


class CheckpointError(LacaxError, ValueError):
  """Model weights or a checkpoint are truncated, corrupt, or do not match the model config.

  Attributes:
    path: the file or directory at fault, or None when the message names a tensor of an already open file.
  """

  def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None):
    self.path = None if path is None else os.fspath(path)
    super().__init__(f"{self.path}: {message}" if self.path else message)


class NonFiniteError(LacaxError, ArithmeticError):
  """A loss or perplexity is NaN or infinite."""


class ResourceError(LacaxError, MemoryError):
  """A request needs more memory than the device has; `.needed` and `.available` are bytes."""

  def __init__(self, message: str, needed: int, available: int | None):
    self.needed = needed
    self.available = available
    super().__init__(message)


class RunError(LacaxError):
  """A run directory cannot be used as asked (resume of a missing run, a different config, ...)."""


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"
