"""Reading and writing lacax's files: atomic writes, standard JSON, and readers whose errors name the file.

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the target (and the
directory fsync'ed), so a kill or a full disk at any moment leaves the old file or the new one, never a torn one;
a failed write removes its temporary file.

JSON is standard (RFC 8259): NaN and infinities, which `json.dump` would write as the non-standard bare
`NaN` / `Infinity`, are encoded as the strings "NaN", "Infinity" and "-Infinity" (`NONFINITE_STRINGS`), and
`to_jsonable` reports where they were so a results file can flag them; numpy scalars and arrays become numbers
and lists.

Readers (`read_text`, `read_json`, `iter_jsonl`) raise `lacax.errors.DataError` naming the file and the
place: the byte offset of text that is not valid in its encoding (and the config option that sets it), the
line and column of invalid JSON, the line of a JSONL record that is not an object or lacks / nulls a field.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np

from lacax.errors import DataError

NONFINITE_STRINGS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_FLOAT_TAG = "__float__"


# --- atomic writes ------------------------------------------------------------------------------------------------


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # some file systems do not open directories
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically: temp file in the same directory, fsync, rename, fsync the directory.

  Raises:
    OSError: the write failed (e.g. ENOSPC); `path` is untouched and no temporary file is left.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  _fsync_directory(directory)


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


# --- standard JSON ------------------------------------------------------------------------------------------------


def to_jsonable(value: Any, where: str = "", nonfinite: list[str] | None = None, *, tagged: bool = False) -> Any:
  """`value` with numpy types converted and non-finite floats encoded.

  Args:
    value: nested dicts / lists / tuples / numpy values.
    where: the path of `value` in the document (for `nonfinite`).
    nonfinite: where non-finite floats were found is appended here, e.g. "figures.lacache.ppl", "curve[3]".
    tagged: encode a non-finite float as {"__float__": "nan"} (unambiguous, for files lacax reads back:
      `decode_nonfinite`), instead of the human-readable string "NaN" / "Infinity" / "-Infinity".
  """
  recurse = lambda v, w: to_jsonable(v, w, nonfinite, tagged=tagged)  # noqa: E731
  if isinstance(value, dict):
    return {str(k): recurse(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [recurse(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, np.ndarray):
    return recurse(value.tolist(), where)
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    if math.isfinite(value):
      return value
    if nonfinite is not None:
      nonfinite.append(where)
    kind = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return {_FLOAT_TAG: kind} if tagged else NONFINITE_STRINGS[kind]
  if value is None or isinstance(value, str):
    return value
  return str(value)


def dumps(value: Any, *, indent: int | None = 1, tagged: bool = False) -> str:
  """Standard JSON text of `value` (see `to_jsonable`); never a bare NaN."""
  return json.dumps(to_jsonable(value, tagged=tagged), indent=indent, sort_keys=True, allow_nan=False,
                    ensure_ascii=False)


def write_json(path: str, value: Any, *, tagged: bool = False) -> None:
  """Writes `value` as standard JSON, atomically."""
  atomic_write_text(path, dumps(value, tagged=tagged) + "\n")


def decode_nonfinite(value: Any) -> Any:
  """Inverse of `to_jsonable(..., tagged=True)`: {"__float__": "nan"} -> nan, recursively."""
  if isinstance(value, dict):
    if len(value) == 1 and _FLOAT_TAG in value:
      return float(value[_FLOAT_TAG])
    return {k: decode_nonfinite(v) for k, v in value.items()}
  if isinstance(value, list):
    return [decode_nonfinite(v) for v in value]
  return value


# --- readers --------------------------------------------------------------------------------------------------------


def read_text(path: str, *, encoding: str = "utf-8", option: str | None = None) -> str:
  """The text of a file, decoded strictly.

  Args:
    path: the file.
    encoding: its encoding.
    option: the config field that sets `encoding`, named in the error (e.g. "data.encoding").

  Raises:
    DataError: the bytes are not valid `encoding` (the message gives the byte offset and the bytes).
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode(encoding)
  except UnicodeDecodeError as e:
    hint = f"; set {option} to the file's encoding" if option else ""
    raise DataError(path, f"not valid {encoding} text ({e.reason}: {data[e.start:e.end + 3]!r}){hint}",
                    where=f"byte offset {e.start}") from None
  except LookupError:
    raise DataError(path, f"unknown encoding {encoding!r}" + (f" ({option})" if option else "")) from None


def read_json(path: str, *, what: str = "JSON file") -> Any:
  """A JSON document; invalid JSON or text raises `DataError` naming the file, line and column."""
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(path, f"invalid {what}: {e.msg}", where=f"line {e.lineno}, column {e.colno}") from None


def iter_jsonl(path: str, *, encoding: str = "utf-8", option: str | None = None
               ) -> Iterator[tuple[int, dict[str, Any]]]:
  """(1-based line number, object) for each non-blank line of a JSONL file.

  Raises:
    DataError: the file is not valid text, a line is not JSON, or a line is not a JSON object.
  """
  text = read_text(path, encoding=encoding, option=option)
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(path, f"invalid JSON ({e.msg} at column {e.colno})", where=f"line {line_number}") from None
    if not isinstance(record, dict):
      raise DataError(path, f"expected a JSON object, got {type(record).__name__}", where=f"line {line_number}")
    yield line_number, record


def require_text(record: dict[str, Any], field: str, path: str, line: int, *, option: str | None = None) -> str:
  """`record[field]` as a string; a missing field or a JSON null raises `DataError` naming file, line, field."""
  hint = f" (set {option} to the text field)" if option else ""
  if field not in record:
    raise DataError(path, f"missing field {field!r}{hint}; the record has {sorted(record)}", where=f"line {line}")
  value = record[field]
  if value is None:
    raise DataError(path, f"field {field!r} is null where text is expected", where=f"line {line}")
  if not isinstance(value, str):
    raise DataError(path, f"field {field!r} must be a string, got {type(value).__name__}", where=f"line {line}")
  return value


def check_readable(path: str, what: str, *, expect: Sequence[str] = ("file",)) -> str | None:
  """A problem message when `path` is not an existing (non-empty) file or directory as `expect` allows."""
  if not os.path.exists(path):
    return f"{what}={path!r} does not exist"
  if os.path.isdir(path):
    return None if "dir" in expect else f"{what}={path!r} is a directory; expected a file"
  if "file" not in expect:
    return f"{what}={path!r} is a file; expected a directory"
  if not os.access(path, os.R_OK):
    return f"{what}={path!r} is not readable"
  if os.path.getsize(path) == 0:
    return f"{what}={path!r} is empty"
  return None
