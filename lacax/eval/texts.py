"""Evaluation text: the embedded default (prose every Python install has) or the user's files."""

from __future__ import annotations

import glob
import json
import os


def default_text() -> str:
  """English prose shipped with CPython: the language-reference topics of `pydoc_data.topics`."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top

  topics = pydoc_data.topics.topics
  return "\n\n".join(topics[k] for k in sorted(topics))


def _read_jsonl(path: str, field: str) -> list[str]:
  texts = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {line_no}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{path}, line {line_no}: missing field {field!r} (set data.field to the text field)")
      texts.append(str(record[field]))
  return texts


def load_text(path: str = "", field: str = "text") -> str:
  """The evaluation text.

  Args:
    path: "" for the embedded default; a text file; a folder (its *.txt files, sorted, concatenated, as the
      LaCache driver concatenates PG19 books); or a .jsonl file (the `field` of every record, concatenated).
    field: the text field of JSONL records.
  """
  if not path:
    return default_text()
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.txt")))
    if not files:
      raise FileNotFoundError(f"data.path={path!r} is a folder without *.txt files")
    return "\n\n".join(open(f, encoding="utf-8").read() for f in files)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.path={path!r} does not exist (expected a text file, a folder or a .jsonl file)")
  if path.endswith(".jsonl"):
    return "\n\n".join(_read_jsonl(path, field))
  with open(path, encoding="utf-8") as f:
    return f.read()
