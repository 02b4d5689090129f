"""Evaluation text: the embedded default (prose every Python install has) or the user's files."""

from __future__ import annotations

import glob
import os

from lacax import io
from lacax.errors import DataError


def default_text() -> str:
  """English prose shipped with CPython: the language-reference topics of `pydoc_data.topics`."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top

  topics = pydoc_data.topics.topics
  return "\n\n".join(topics[k] for k in sorted(topics))


def _read_jsonl(path: str, field: str, encoding: str, option: str) -> list[str]:
  return [io.require_text(record, field, path, line, option=f"{option}.field")
          for line, record in io.iter_jsonl(path, encoding=encoding, option=f"{option}.encoding")]


def load_text(path: str = "", field: str = "text", *, encoding: str = "utf-8", option: str = "data") -> str:
  """The evaluation text.

  Args:
    path: "" for the embedded default; a text file; a folder (its *.txt files, sorted, concatenated, as the
      LaCache driver concatenates PG19 books); or a .jsonl file (the `field` of every record, concatenated).
    field: the text field of JSONL records.
    encoding: the files' text encoding.
    option: the config section that holds `path` (named in errors: "data.encoding", "haystack.field", ...).

  Raises:
    FileNotFoundError: `path` does not exist, or is a folder without *.txt files.
    lacax.errors.DataError: a file is not UTF-8 (file and byte offset), a JSONL line is not a JSON object, or
      its `field` is missing or null (file and line).
  """
  if not path:
    return default_text()
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.txt")))
    if not files:
      raise FileNotFoundError(f"data.path={path!r} is a folder without *.txt files")
    return "\n\n".join(io.read_text(f, encoding=encoding, option=f"{option}.encoding") for f in files)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.path={path!r} does not exist (expected a text file, a folder or a .jsonl file)")
  if path.endswith(".jsonl"):
    return "\n\n".join(_read_jsonl(path, field, encoding, option))
  return io.read_text(path, encoding=encoding, option=f"{option}.encoding")


def text_problems(path: str, field: str = "text", *, encoding: str = "utf-8", option: str = "data") -> list[str]:
  """What `load_text(path, field, encoding=...)` would fail on, as messages (for validation before any work)."""
  if not path:
    return []
  if os.path.isdir(path):
    return [] if glob.glob(os.path.join(path, "*.txt")) else [f"{option}.path={path!r} is a folder without *.txt files"]
  problem = io.check_readable(path, f"{option}.path")
  if problem:
    return [problem]
  try:
    text = load_text(path, field, encoding=encoding, option=option)
  except (DataError, FileNotFoundError) as e:
    return [str(e)]
  return [] if text.strip() else [f"{option}.path={path!r} holds no text"]
