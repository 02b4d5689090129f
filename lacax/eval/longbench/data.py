"""Reading LongBench data and prediction files (JSONL through `lacax.io`; errors name file, line, field)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from lacax import io as lacax_io
from lacax.errors import DataError
from lacax.eval.longbench.tasks import MAX_NEW_TOKENS, TASKS, check_task


# --------------------------------------------------------------------------------------------------------------
# Data loading.
# --------------------------------------------------------------------------------------------------------------


class LongBenchFormatError(DataError):
  """A JSONL record that cannot be read; the message names the file, the 1-based line and the field (or the byte
  offset of text that is not UTF-8)."""

  def __init__(self, path: str | os.PathLike[str], line: int | None, message: str, field: str | None = None,
               where: str | None = None):
    self.line = line
    self.field = field
    super().__init__(path, message, where=where or f"line {line}")


@dataclasses.dataclass(frozen=True)
class LongBenchExample:
  """One LongBench (or LongBench-E) test example.

  Attributes:
    input: the question / query / code suffix; may be empty (e.g. gov_report).
    context: the long document.
    answers: the reference answers; the score is the maximum over them.
    length: the official length of the example (words for English, characters for Chinese); LongBench-E
      buckets use it.
    dataset: the ``dataset`` field as stored (e.g. ``"qasper"`` or ``"qasper_e"``).
    language: the ``language`` field as stored (``"en"``, ``"zh"``, or a programming language for code tasks).
    all_classes: the label set of the classification tasks (trec, lsht), None elsewhere.
    id: the ``_id`` field.
  """

  input: str
  context: str
  answers: tuple[str, ...]
  length: int
  dataset: str
  language: str
  all_classes: tuple[str, ...] | None
  id: str


@dataclasses.dataclass(frozen=True)
class PredictionRecord:
  """One line of an official prediction file (``pred/<model>/<task>.jsonl``): what `score_task` consumes.

  Attributes:
    pred: the decoded model output.
    answers: the reference answers of the example.
    all_classes: the task's label set (trec, lsht) or None.
    length: the example's ``length`` field; only LongBench-E scoring needs it.
  """

  pred: str
  answers: tuple[str, ...]
  all_classes: tuple[str, ...] | None = None
  length: int | None = None


_EXAMPLE_FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")
_PREDICTION_FIELDS = ("pred", "answers", "all_classes")


def _iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (1-based line number, JSON object) for each non-blank line of a UTF-8 JSONL file (`lacax.io`)."""
  try:
    yield from lacax_io.iter_jsonl(os.fspath(path))
  except DataError as e:
    if isinstance(e, LongBenchFormatError):
      raise
    line = int(e.where.split()[1]) if e.where and e.where.startswith("line ") else None
    raise LongBenchFormatError(path, line, e.problem, where=e.where) from None


def _require(record: Mapping[str, Any], fields: Sequence[str], path: str | os.PathLike[str], line: int) -> None:
  for name in fields:
    if name not in record:
      raise LongBenchFormatError(
          path, line, f"missing field {name!r} (required fields: {', '.join(fields)})", field=name)


def _string(record: Mapping[str, Any], name: str, path: str | os.PathLike[str], line: int) -> str:
  value = record[name]
  if not isinstance(value, str):
    raise LongBenchFormatError(
        path, line, f"field {name!r} must be a string, got {type(value).__name__} {value!r:.60}", field=name)
  return value


def _string_list(record: Mapping[str, Any], name: str, path: str | os.PathLike[str], line: int,
                 nullable: bool = False) -> tuple[str, ...] | None:
  value = record[name]
  if value is None and nullable:
    return None
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    expected = "a list of strings" + (" or null" if nullable else "")
    raise LongBenchFormatError(
        path, line, f"field {name!r} must be {expected}, got {value!r:.80}", field=name)
  return tuple(value)


def _integer(record: Mapping[str, Any], name: str, path: str | os.PathLike[str], line: int,
             nullable: bool = False) -> int | None:
  value = record[name]
  if value is None and nullable:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    expected = "a non-negative integer" + (" or null" if nullable else "")
    raise LongBenchFormatError(path, line, f"field {name!r} must be {expected}, got {value!r:.60}", field=name)
  return value


def load_longbench_file(path: str | os.PathLike[str]) -> list[LongBenchExample]:
  """Reads one LongBench-format JSONL file (``<task>.jsonl`` or ``<task>_e.jsonl``).

  Every line must be a JSON object with the fields ``input``, ``context``, ``answers``, ``length``,
  ``dataset``, ``language``, ``all_classes`` and ``_id`` (extra fields are ignored); blank lines are skipped.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    LongBenchFormatError: a line is not JSON, not an object, lacks a field or has a field of the wrong type;
      the message names the file, the line number and the field.
  """
  examples = []
  for line, record in _iter_jsonl(path):
    _require(record, _EXAMPLE_FIELDS, path, line)
    examples.append(LongBenchExample(
        input=_string(record, "input", path, line),
        context=_string(record, "context", path, line),
        answers=_string_list(record, "answers", path, line),
        length=_integer(record, "length", path, line),
        dataset=_string(record, "dataset", path, line),
        language=_string(record, "language", path, line),
        all_classes=_string_list(record, "all_classes", path, line, nullable=True),
        id=_string(record, "_id", path, line),
    ))
  return examples


def task_from_filename(path: str | os.PathLike[str]) -> tuple[str, bool]:
  """Maps ``.../<task>.jsonl`` -> (task, False) and ``.../<task>_e.jsonl`` -> (task, True).

  Raises:
    ValueError: the file name is not ``<task>.jsonl`` / ``<task>_e.jsonl`` for a LongBench task.
  """
  name = os.path.basename(os.fspath(path))
  stem = name[:-len(".jsonl")] if name.endswith(".jsonl") else None
  if stem in MAX_NEW_TOKENS:
    return stem, False
  if stem is not None and stem.endswith("_e") and stem[:-2] in MAX_NEW_TOKENS:
    return stem[:-2], True
  raise ValueError(f"cannot tell the LongBench task from the file name {name!r}: expected '<task>.jsonl' or "
                   f"'<task>_e.jsonl' with <task> one of {', '.join(TASKS)}")


def load_longbench(path: str | os.PathLike[str], *, tasks: Iterable[str] | None = None,
                   longbench_e: bool = False) -> dict[str, list[LongBenchExample]]:
  """Loads local LongBench data, keyed by task name (``_e`` suffix removed).

  Args:
    path: a folder holding ``<task>.jsonl`` files (``<task>_e.jsonl`` when ``longbench_e``), as unpacked from
      the official ``data.zip``; or a single such file.
    tasks: the tasks to load from a folder (a single name is accepted too). Every named task must have its file.
      None loads every task whose file is present (at least one must be).
    longbench_e: read the LongBench-E files ``<task>_e.jsonl`` instead of ``<task>.jsonl``.

  Returns:
    ``{task: [LongBenchExample, ...]}`` in the official task order.

  Raises:
    FileNotFoundError: ``path`` does not exist, a named task's file is missing, or the folder has no task file.
    ValueError: an unknown task name, or a file name that names no task.
    LongBenchFormatError: a malformed line (see `load_longbench_file`).
  """
  path = os.fspath(path)
  if isinstance(tasks, str):
    tasks = [tasks]
  if os.path.isfile(path):
    task, _ = task_from_filename(path)  # A single file is read whatever its flavour (plain or _e).
    if tasks is not None and task not in set(tasks):
      raise ValueError(f"{path} holds task {task!r}, which is not among tasks={sorted(set(tasks))}")
    return {task: load_longbench_file(path)}
  if not os.path.isdir(path):
    raise FileNotFoundError(f"LongBench path {path!r} is neither a file nor a folder")

  suffix = "_e.jsonl" if longbench_e else ".jsonl"
  wanted = [check_task(t) for t in tasks] if tasks is not None else None
  data: dict[str, list[LongBenchExample]] = {}
  for task in TASKS:
    if wanted is not None and task not in wanted:
      continue
    file_path = os.path.join(path, task + suffix)
    if os.path.isfile(file_path):
      data[task] = load_longbench_file(file_path)
    elif wanted is not None:
      raise FileNotFoundError(f"no file for LongBench task {task!r}: expected {file_path}")
  if not data:
    raise FileNotFoundError(f"no LongBench task file '<task>{suffix}' in {path}")
  return data


def load_predictions(path: str | os.PathLike[str]) -> dict[str, list[PredictionRecord]]:
  """Loads official-format prediction files: one ``<task>.jsonl`` or a folder of them.

  Each line needs ``pred``, ``answers`` and ``all_classes``; ``length`` is optional (LongBench-E needs it).
  Files in a folder whose name names no LongBench task (e.g. ``result.json``) are ignored.

  Returns:
    ``{task: [PredictionRecord, ...]}``.

  Raises:
    FileNotFoundError: ``path`` does not exist or the folder holds no task file.
    LongBenchFormatError: a malformed line; the message names the file, the line and the field.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    files = [path]
  elif os.path.isdir(path):
    files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".jsonl"))
  else:
    raise FileNotFoundError(f"prediction path {path!r} is neither a file nor a folder")
  results: dict[str, list[PredictionRecord]] = {}
  for file_path in files:
    try:
      task, _ = task_from_filename(file_path)
    except ValueError:
      if len(files) == 1 and file_path == path:
        raise
      continue
    records = []
    for line, record in _iter_jsonl(file_path):
      _require(record, _PREDICTION_FIELDS, file_path, line)
      records.append(PredictionRecord(
          pred=_string(record, "pred", file_path, line),
          answers=_string_list(record, "answers", file_path, line),
          all_classes=_string_list(record, "all_classes", file_path, line, nullable=True),
          length=_integer(record, "length", file_path, line, nullable=True) if "length" in record else None,
      ))
    results[task] = records
  if not results:
    raise FileNotFoundError(f"no '<task>.jsonl' prediction file in {path}")
  return results
