"""The multi-grained MG-Verilog record, and readers / writers for the released dataset's layouts.

A `Record` is one piece of code with its descriptions at MG-Verilog's four levels (arXiv 2407.01910):
high-level summary, detailed global summary, block summaries, line-by-line comments. The released data has
only the first three as training pairs (line comments are an intermediate artefact), so `line` may be empty.

Layouts read and written (all as JSON Lines or JSON arrays; `datasets.save_to_disk` folders hold the same
records in Arrow files, which `datasets.load_from_disk(...).to_json(...)` turns into these):

  "splits"    the first Hugging Face layout of GaTech-EIC/MG-Verilog: one file per split,
              `high_level_global_summary_dataset`, `detailed_global_summary_dataset`, `block_summary_dataset`
              (and `merged_dataset`), each record `{"description": <LLaMA-2 chat prompt>, "code": <module body>}`.
              The prompt is the reference's `Data4AIGChipDataset` format: `<s>[INST] <<SYS>>...<</SYS>>`
              + "Implement the Verilog module based on the following description..." + the description + the
              module header + ` [/INST]`; the code is the body without the header, ending in `endmodule`.
              Records of the same code across splits are joined into one Record.
  "dict"      the current card's single `train` split: `{"code": ..., "description": {"block_summary": ...,
              "detailed_global_summary": ..., "high_level_global_summary": ...}}`, each value "<description>\\n
              <module header>".
  "toolkit"   the LLM4HWDesign Starting Toolkit's `dataset.jsonl` of `{"input", "output"}`: the description dict
              flattened with `", ".join(f"{k}: {v}")` (its conversion script) or `";\\n".join(...) + "\\n"` (its
              README); write-only here, with the separator recorded by the caller.
  "lacax"     lacax's own JSONL: every field of `Record`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

LEVELS = ("high_level", "detailed", "block", "line")
SPLIT_FILES = {"high_level": "high_level_global_summary_dataset", "detailed": "detailed_global_summary_dataset",
               "block": "block_summary_dataset"}
DICT_KEYS = {"high_level": "high_level_global_summary", "detailed": "detailed_global_summary",
             "block": "block_summary"}
TOOLKIT_SEPARATORS = {"comma": ", ", "semicolon": ";\n"}

SYSTEM_PROMPT = ("You only complete chats with syntax correct Verilog code. End the Verilog module code "
                 "completion with 'endmodule'. Do not include module, input and output definitions.")
QUESTION = "Implement the Verilog module based on the following description. Assume that signals are positive clock/clk triggered unless otherwise stated."

_CHAT_RE = re.compile(r"<s>\s*\[INST\]\s*<<SYS>>(?P<sys>.*?)<</SYS>>(?P<body>.*?)\[/INST\]", re.DOTALL)
_HEADER_RE = re.compile(r"\bmodule\s+\w+\s*(#\s*\(.*?\)\s*)?\(.*?\)\s*;", re.DOTALL)
_BLOCK_RE = re.compile(r"^\s*block_(\d+)\s*:\s*", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Record:
  """One code sample with its multi-grained descriptions.

  Attributes:
    code: the complete module (header included).
    module_header: the `module name (...);` header.
    high_level, detailed: the two global summaries ("" when absent).
    block: the block summaries, in order.
    line_comments: (line number, comment) pairs.
    meta: provenance (source layout, file, template, family, ...).
  """

  code: str
  module_header: str
  high_level: str = ""
  detailed: str = ""
  block: tuple[str, ...] = ()
  line_comments: tuple[tuple[int, str], ...] = ()
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def has(self, level: str) -> bool:
    return bool(self.description(level))

  def description(self, level: str) -> str:
    """The description text at `level` (block summaries as `block_i: ...` lines, line comments as `line n:`)."""
    if level == "high_level":
      return self.high_level
    if level == "detailed":
      return self.detailed
    if level == "block":
      return "\n".join(f"block_{i}: {s}" for i, s in enumerate(self.block))
    if level == "line":
      return "\n".join(f"line {n}: {c}" for n, c in self.line_comments)
    raise ValueError(f"level={level!r} must be one of {LEVELS}")

  @property
  def levels(self) -> tuple[str, ...]:
    return tuple(l for l in LEVELS if self.has(l))

  @property
  def body(self) -> str:
    """The code after the header (what the released pairs hold as `code`)."""
    i = self.code.find(self.module_header)
    return self.code[i + len(self.module_header):].lstrip("\n") if i >= 0 else self.code

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["block"], d["line_comments"] = list(self.block), [list(x) for x in self.line_comments]
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Record":
    missing = {"code", "module_header"} - set(d)
    if missing:
      raise ValueError(f"record needs {sorted(missing)}; got keys {sorted(d)}")
    return cls(d["code"], d["module_header"], d.get("high_level", ""), d.get("detailed", ""),
               tuple(d.get("block", ())), tuple((int(n), c) for n, c in d.get("line_comments", ())),
               dict(d.get("meta", {})))


def split_header(text: str) -> tuple[str, str]:
  """(description, module header) of "<description>\\n<module header>"; header "" when none is found."""
  m = None
  for m in _HEADER_RE.finditer(text):
    pass
  if m is None:
    return text.strip(), ""
  return text[:m.start()].strip(), m.group(0)


def parse_blocks(text: str) -> tuple[str, ...]:
  """Block summaries from MG-Verilog's "block_0: ... block_1: ..." text (a single block if unnumbered)."""
  marks = list(_BLOCK_RE.finditer(text))
  if not marks:
    return (text.strip(),) if text.strip() else ()
  return tuple(text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))].strip()
               for i, m in enumerate(marks))


def chat_prompt(description: str, header: str) -> str:
  """The reference's LLaMA-2 chat prompt for a description and module header (`Data4AIGChipDataset`)."""
  return (f"<s>[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n{QUESTION}\n{description}\n"
          f"Module header:\n\n{header}\n [/INST]")


def parse_chat_prompt(prompt: str) -> tuple[str, str]:
  """(description, module header) from a chat prompt of the "splits" layout."""
  m = _CHAT_RE.search(prompt)
  body = m.group("body") if m else prompt
  body = body.replace(QUESTION, "").replace("Module header:", "")
  return split_header(body)


def _read_any(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  stripped = text.lstrip()
  if stripped.startswith("["):
    data = json.loads(text)
  else:
    data = []
    for i, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          data.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i}: not JSON ({e})") from None
  if not all(isinstance(d, dict) for d in data):
    raise ValueError(f"{path}: expected JSON objects")
  return data


def _find(folder: str, stem: str) -> str | None:
  for cand in (f"{stem}.jsonl", f"{stem}.json", os.path.join(stem, "data.jsonl"), os.path.join(stem, "data.json")):
    if os.path.exists(os.path.join(folder, cand)):
      return os.path.join(folder, cand)
  return None


def _join(header: str, body: str) -> str:
  return header.rstrip() + "\n" + body.lstrip("\n")


def load_splits(folder: str) -> list[Record]:
  """The "splits" layout: per-level files joined by code into multi-level Records."""
  by_code: dict[str, dict[str, Any]] = {}
  found = []
  for level, stem in SPLIT_FILES.items():
    path = _find(folder, stem)
    if path is None:
      continue
    found.append(stem)
    for i, row in enumerate(_read_any(path)):
      if "description" not in row or "code" not in row:
        raise ValueError(f"{path} row {i}: expected 'description' and 'code', got {sorted(row)}")
      desc, header = parse_chat_prompt(row["description"])
      entry = by_code.setdefault(row["code"], {"header": header, "source": []})
      entry["header"] = entry["header"] or header
      entry[level] = desc
      entry["source"].append(stem)
  if not found:
    raise FileNotFoundError(f"none of {sorted(SPLIT_FILES.values())} (.jsonl / .json) in {folder!r}")
  return [Record(_join(e["header"], code), e["header"], e.get("high_level", ""), e.get("detailed", ""),
                 parse_blocks(e.get("block", "")), (), {"layout": "splits", "splits": e["source"]})
          for code, e in by_code.items()]


def load_dict(path: str) -> list[Record]:
  """The "dict" layout: one file of {code, description: {block_summary, detailed_..., high_level_...}}."""
  out = []
  for i, row in enumerate(_read_any(path)):
    desc = row.get("description")
    if not isinstance(desc, Mapping) or "code" not in row:
      raise ValueError(f"{path} row {i}: expected 'code' and a 'description' dict with keys "
                       f"{sorted(DICT_KEYS.values())}, got {sorted(row)}")
    texts, header = {}, ""
    for level, key in DICT_KEYS.items():
      d, h = split_header(desc.get(key, "") or "")
      texts[level], header = d, header or h
    out.append(Record(_join(header, row["code"]), header, texts["high_level"], texts["detailed"],
                      parse_blocks(texts["block"]), (), {"layout": "dict"}))
  return out


def load(path: str) -> list[Record]:
  """Any layout: a folder of split files, a "dict" file, or a lacax JSONL file (told apart by their keys)."""
  if os.path.isdir(path):
    return load_splits(path)
  rows = _read_any(path)
  if rows and "module_header" in rows[0]:
    return [Record.from_json(r) for r in rows]
  return load_dict(path)


def _write_lines(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(tmp, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def write_lacax(path: str, records: Sequence[Record]) -> None:
  _write_lines(path, (r.to_json() for r in records))


def write_splits(folder: str, records: Sequence[Record], merged: bool = True) -> None:
  """The "splits" layout (`<split>.jsonl` per level, plus merged_dataset: every (code, level) pair)."""
  all_rows = []
  for level, stem in SPLIT_FILES.items():
    rows = [{"description": chat_prompt(r.description(level), r.module_header), "code": r.body}
            for r in records if r.has(level)]
    all_rows += rows
    _write_lines(os.path.join(folder, f"{stem}.jsonl"), rows)
  if merged:
    _write_lines(os.path.join(folder, "merged_dataset.jsonl"), all_rows)


def write_dict(path: str, records: Sequence[Record]) -> None:
  _write_lines(path, ({"code": r.body, "description": {
      key: f"{r.description(level)}\n{r.module_header}" for level, key in DICT_KEYS.items()}} for r in records))


def write_toolkit(path: str, records: Sequence[Record], separator: str = "comma") -> None:
  """The Starting Toolkit's `{input, output}` JSONL; separator "comma" (its script) or "semicolon" (its README)."""
  if separator not in TOOLKIT_SEPARATORS:
    raise ValueError(f"separator={separator!r} must be one of {sorted(TOOLKIT_SEPARATORS)}")
  sep = TOOLKIT_SEPARATORS[separator]

  def flat(r):
    parts = [f"{key}: {r.description(level)}\n{r.module_header}" for level, key in DICT_KEYS.items()]
    return sep.join(parts) + ("\n" if separator == "semicolon" else "")

  _write_lines(path, ({"input": flat(r), "output": r.body} for r in records))


def from_task(task) -> Record:
  """A Record with all four levels from a generated task (`lacax.hw.mg_verilog.tasks.Task`)."""
  return Record(task.reference, task.interface, task.levels["high_level"], task.levels["detailed"],
                tuple(task.block_summaries), tuple(task.line_comments),
                {"layout": "synthetic", "task": task.task_id, "template": task.template, "family": task.family})
