"""LongBench v1 / LongBench-E: data loading, prompts and the official metrics, offline.

This module reproduces the scoring of THUDM/LongBench (`LongBench/eval.py`, `metrics.py`, configs) as used
unchanged by GATECH-EIC/LaCache (`LongBench/eval.py`, which only adds an unweighted average over tasks), with
pure-Python re-implementations of the two third-party scorers the official code calls:

* ``rouge==1.0.1`` (``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]``), see `rouge_l_f1`;
* ``fuzzywuzzy==0.18.0`` ``fuzz.ratio`` without python-Levenshtein (LaCache's environment pins fuzzywuzzy and
  does not install python-Levenshtein, so fuzzywuzzy falls back to `difflib`), see `fuzz_ratio`.

Only the Chinese metrics need a third-party package: ``jieba`` (``pip install jieba``), imported lazily.

Pipeline (mirrors the official ``pred.py``; the model side lives elsewhere)::

  examples = load_longbench("/data/longbench", tasks=["qasper"])      # {task: [LongBenchExample]}
  prompt = build_prompt("qasper", ex)                                  # PROMPT_TEMPLATES[task].format(...)
  prompt = truncate_prompt(prompt, max_len, encode, decode)            # middle truncation, text round trip
  if uses_chat_template("qasper"): prompt = <model chat template>(prompt)
  pred = <greedy decode of at most MAX_NEW_TOKENS["qasper"] tokens>
  scores = score_longbench({"qasper": [PredictionRecord(pred, ex.answers, ex.all_classes, ex.length), ...]})

Known, documented differences from the official code are listed in the docstrings of `rouge_l_f1`,
`code_sim_score`, `middle_truncate`, `score_task` and `score_task_e`; none changes a score except in the
failure cases named there.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import math
import os
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from lacax import io as lacax_io
from lacax.errors import DataError

# --------------------------------------------------------------------------------------------------------------
# Task tables (facts from THUDM/LongBench `config/*.json` and `pred.py`, identical in GATECH-EIC/LaCache).
# --------------------------------------------------------------------------------------------------------------

TASKS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)
"""The 21 LongBench v1 tasks, in the official order."""

LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
"""The 13 tasks that LongBench-E (length-balanced, files ``<task>_e.jsonl``) provides."""

FIRST_LINE_TASKS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Few-shot tasks whose prediction is cut to its first line before scoring (``eval.py``)."""

NO_CHAT_TEMPLATE_TASKS: frozenset[str] = FIRST_LINE_TASKS | {"lcc", "repobench-p"}
"""Tasks whose prompt is fed raw, without the model's chat template (``pred.py``).

This is the four first-line tasks *plus* the two code-completion tasks: ``pred.py`` skips ``build_chat`` for
trec, triviaqa, samsum, lsht, lcc and repobench-p, while ``eval.py`` cuts to the first line only for the first
four (code scoring picks its own line, see `code_sim_score`).
"""

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
"""Task -> maximum number of generated tokens (``config/dataset2maxlen.json``)."""

LENGTH_BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")
"""LongBench-E length buckets over the example's ``length`` field: [0, 4000), [4000, 8000), [8000, inf)."""

# Reproduced character for character from `config/dataset2prompt.json`, typos included ("asconcisely"):
# a changed prompt would change the scores being compared against.
_MULTI_DOC_QA_TEMPLATE = (  # hotpotqa, 2wikimqa and musique share it.
    'Answer the question based on the given passages. Only give me the answer and do not output '
    'any other words.\n\n'
    'The following are given passages.\n'
    '{context}\n\n'
    'Answer the question based on the given passages. Only give me the answer and do not output '
    'any other words.\n\n'
    'Question: {input}\n'
    'Answer:'
)
PROMPT_TEMPLATES: dict[str, str] = {
  'narrativeqa': (
      'You are given a story, which can be either a novel or a movie script, and a question. Answer '
      'the question asconcisely as you can, using a single phrase if possible. Do not provide any '
      'explanation.\n\n'
      'Story: {context}\n\n'
      'Now, answer the question based on the story asconcisely as you can, using a single phrase '
      'if possible. Do not provide any explanation.\n\n'
      'Question: {input}\n\n'
      'Answer:'
  ),
  'qasper': (
      'You are given a scientific article and a question. Answer the question as concisely as you '
      'can, using a single phrase or sentence if possible. If the question cannot be answered based '
      'on the information in the article, write "unanswerable". If the question is a yes/no question, '
      'answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\n'
      'Article: {context}\n\n'
      ' Answer the question based on the above article as concisely as you can, using a single '
      'phrase or sentence if possible. If the question cannot be answered based on the information '
      'in the article, write "unanswerable". If the question is a yes/no question, answer "yes", '
      '"no", or "unanswerable". Do not provide any explanation.\n\n'
      'Question: {input}\n\n'
      'Answer:'
  ),
  'multifieldqa_en': (
      'Read the following text and answer briefly.\n\n'
      '{context}\n\n'
      'Now, answer the following question based on the above text, only give me the answer and '
      'do not output any other words.\n\n'
      'Question: {input}\n'
      'Answer:'
  ),
  'multifieldqa_zh': (
      '阅读以下文字并用中文简短回答：\n\n'
      '{context}\n\n'
      '现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n'
      '问题：{input}\n'
      '回答：'
  ),
  'hotpotqa': _MULTI_DOC_QA_TEMPLATE,
  '2wikimqa': _MULTI_DOC_QA_TEMPLATE,
  'musique': _MULTI_DOC_QA_TEMPLATE,
  'dureader': (
      '请基于给定的文章回答下述问题。\n\n'
      '文章：{context}\n\n'
      '请基于上述文章回答下面的问题。\n\n'
      '问题：{input}\n'
      '回答：'
  ),
  'gov_report': (
      'You are given a report by a government agency. Write a one-page summary of the report.\n\n'
      'Report:\n'
      '{context}\n\n'
      'Now, write a one-page summary of the report.\n\n'
      'Summary:'
  ),
  'qmsum': (
      'You are given a meeting transcript and a query containing a question or instruction. Answer '
      'the query in one or more sentences.\n\n'
      'Transcript:\n'
      '{context}\n\n'
      'Now, answer the query based on the above meeting transcript in one or more sentences.\n\n'
      'Query: {input}\n'
      'Answer:'
  ),
  'multi_news': (
      'You are given several news passages. Write a one-page summary of all news. \n\n'
      'News:\n'
      '{context}\n\n'
      'Now, write a one-page summary of all the news.\n\n'
      'Summary:'
  ),
  'vcsum': (
      '下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n'
      '会议记录：\n'
      '{context}\n\n'
      '会议总结：'
  ),
  'trec': (
      'Please determine the type of the question below. Here are some examples of questions.\n\n'
      '{context}\n'
      '{input}'
  ),
  'triviaqa': (
      'Answer the question based on the given passage. Only give me the answer and do not output '
      'any other words. The following are some examples.\n\n'
      '{context}\n\n'
      '{input}'
  ),
  'samsum': (
      'Summarize the dialogue into a few short sentences. The following are some examples.\n\n'
      '{context}\n\n'
      '{input}'
  ),
  'lsht': (
      '请判断给定新闻的类别，下面是一些例子。\n\n'
      '{context}\n'
      '{input}'
  ),
  'passage_count': (
      'There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. '
      'Please carefully read these paragraphs and determine how many unique paragraphs there are '
      'after removing duplicates. In other words, how many non-repeating paragraphs are there in '
      'total?\n\n'
      '{context}\n\n'
      'Please enter the final count of unique paragraphs after removing duplicates. The output '
      'format should only contain the number, such as 1, 2, 3, and so on.\n\n'
      'The final answer is: '
  ),
  'passage_retrieval_en': (
      'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph '
      'the abstract is from.\n\n'
      '{context}\n\n'
      'The following is an abstract.\n\n'
      '{input}\n\n'
      'Please enter the number of the paragraph that the abstract is from. The answer format must '
      'be like "Paragraph 1", "Paragraph 2", etc.\n\n'
      'The answer is: '
  ),
  'passage_retrieval_zh': (
      '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n'
      '{context}\n\n'
      '下面是一个摘要\n\n'
      '{input}\n\n'
      '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n'
      '答案是：'
  ),
  'lcc': (
      'Please complete the code given below. \n'
      '{context}Next line of code:\n'
  ),
  'repobench-p': (
      'Please complete the code given below. \n'
      '{context}{input}Next line of code:\n'
  ),
}
"""Task -> prompt template with ``{context}`` and ``{input}`` fields (``config/dataset2prompt.json``)."""


def check_task(task: str) -> str:
  """Returns ``task`` if it is a LongBench v1 task name, else raises ValueError naming the known tasks."""
  if task not in MAX_NEW_TOKENS:
    raise ValueError(f"unknown LongBench task {task!r}; expected one of {', '.join(TASKS)}")
  return task


def uses_chat_template(task: str) -> bool:
  """Whether the official ``pred.py`` wraps this task's prompt in the model's chat template."""
  return check_task(task) not in NO_CHAT_TEMPLATE_TASKS


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


# --------------------------------------------------------------------------------------------------------------
# Prompts and truncation.
# --------------------------------------------------------------------------------------------------------------


def build_prompt(task: str, example: LongBenchExample | Mapping[str, Any]) -> str:
  """Fills the task's official template with the example's ``context`` and ``input``.

  The chat template and truncation are separate steps (`truncate_prompt`, `uses_chat_template`), applied in
  the official order: template -> middle truncation -> chat template.
  """
  template = PROMPT_TEMPLATES[check_task(task)]
  if isinstance(example, LongBenchExample):
    return template.format(context=example.context, input=example.input)
  for name in ("context", "input"):
    if name not in example:
      raise KeyError(f"build_prompt({task!r}, ...): the example has no {name!r} field")
  return template.format(context=example["context"], input=example["input"])


_Ids = TypeVar("_Ids")


def middle_truncate(token_ids: _Ids, max_len: int) -> _Ids:
  """Keeps the first and the last ``max_len // 2`` tokens when there are more than ``max_len``.

  As in the official ``pred.py`` (``half = int(max_length / 2)``; ``ids[:half] + ids[-half:]``): the start
  (instructions) and the end (the question) survive, the middle of the context goes. For an odd ``max_len`` the
  result has ``max_len - 1`` tokens, as officially.

  Args:
    token_ids: a list or tuple of ints (returned as the same type) or a 1-D array (returned as a numpy array).
    max_len: the token budget, >= 2 (the official slice ``ids[-0:]`` would return everything for 1).

  Returns:
    ``token_ids`` itself when ``len(token_ids) <= max_len``, else the truncated sequence.
  """
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
    raise ValueError(f"middle_truncate: max_len must be an integer >= 2, got {max_len!r}")
  if isinstance(token_ids, (list, tuple)):
    if len(token_ids) <= max_len:
      return token_ids
    half = max_len // 2
    return token_ids[:half] + token_ids[len(token_ids) - half:]
  array = np.asarray(token_ids)
  if array.ndim != 1:
    raise ValueError(f"middle_truncate: token_ids must be 1-D, got shape {array.shape}")
  if array.shape[0] <= max_len:
    return token_ids
  half = max_len // 2
  return np.concatenate([array[:half], array[array.shape[0] - half:]])


def truncate_prompt(prompt: str, max_len: int, encode: Callable[[str], Sequence[int]],
                    decode: Callable[[Sequence[int]], str]) -> str:
  """The official prompt truncation: tokenize, middle-truncate, and decode both halves back to text.

  Args:
    prompt: the filled template (`build_prompt`).
    max_len: the model's budget (``model2maxlen``, e.g. 3500 for Llama-2-7b-chat-4k).
    encode: text -> token ids, with the tokenizer's usual special tokens (the official call is
      ``tokenizer(prompt, truncation=False).input_ids``).
    decode: token ids -> text without special tokens (``tokenizer.decode(ids, skip_special_tokens=True)``).

  Returns:
    ``prompt`` unchanged if it fits, else ``decode(first half) + decode(last half)``. Re-tokenizing the result
    can give a few tokens more or less than ``max_len``, exactly as in the official pipeline.
  """
  ids = list(encode(prompt))
  if len(ids) <= max_len:
    return prompt
  if max_len < 2:
    raise ValueError(f"truncate_prompt: max_len must be >= 2, got {max_len}")
  half = max_len // 2
  return decode(ids[:half]) + decode(ids[len(ids) - half:])


def first_line(prediction: str) -> str:
  """The first line after leading newlines: what `FIRST_LINE_TASKS` score (``lstrip('\\n').split('\\n')[0]``)."""
  return prediction.lstrip("\n").split("\n")[0]


# --------------------------------------------------------------------------------------------------------------
# Normalisation.
# --------------------------------------------------------------------------------------------------------------

_ASCII_PUNCTUATION = frozenset(string.punctuation)
# The official list of full-width / CJK punctuation, plus ASCII punctuation (`normalize_zh_answer`).
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD-style normalisation used by QA-F1, in the official order.

  lowercase -> drop ASCII punctuation (``string.punctuation``; other Unicode punctuation such as ``’`` stays)
  -> replace the words a / an / the by a space -> collapse whitespace. Punctuation goes before articles, so
  ``"the-end"`` becomes ``"theend"`` and keeps its letters.
  """
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
  """Chinese normalisation: lowercase, drop ASCII and CJK punctuation, drop *all* whitespace."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _ZH_PUNCTUATION)
  return "".join(text.split())


def _jieba_cut(text: str) -> list[str]:
  """``list(jieba.cut(text, cut_all=False))``, importing jieba on first use."""
  try:
    import jieba  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "the Chinese LongBench metrics (multifieldqa_zh, dureader, vcsum) segment words with jieba, which is "
        "not installed: run `pip install jieba` (the official runs used jieba==0.42.1)") from e
  return list(jieba.cut(text, cut_all=False))


# --------------------------------------------------------------------------------------------------------------
# Metrics. Each takes (prediction, ground_truth) plus keyword options and returns a score in [0, 1].
# --------------------------------------------------------------------------------------------------------------


class Metric(Protocol):
  """A per-reference metric: (prediction, one reference answer, all_classes=...) -> score in [0, 1]."""

  __name__: str

  def __call__(self, prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    ...


def token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
  """Bag-of-tokens F1 (multiset overlap), 0 when nothing overlaps (including empty inputs)."""
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  # Same operation order as the official code, so the floats are bit-identical.
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
  """Token F1 after `normalize_answer`, on whitespace tokens."""
  return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, *, cut: Callable[[str], Iterable[str]] | None = None,
                   **_: Any) -> float:
  """Token F1 on jieba words, each word normalised by `normalize_zh_answer` and dropped if it becomes empty.

  Args:
    cut: the word segmenter; default ``jieba.cut(text, cut_all=False)`` as officially (needs ``pip install
      jieba``). Pass another callable only for tests or deliberate experiments.
  """
  cut = _jieba_cut if cut is None else cut
  prediction_tokens = [t for t in (normalize_zh_answer(w) for w in cut(prediction)) if t]
  ground_truth_tokens = [t for t in (normalize_zh_answer(w) for w in cut(ground_truth)) if t]
  return token_f1(prediction_tokens, ground_truth_tokens)


def _rouge_sentences(text: str) -> list[list[str]]:
  """rouge 1.0.1 tokenisation: split on ".", drop empty pieces, squeeze whitespace, split words on " "."""
  # A whitespace-only piece survives the emptiness test and becomes the one-word sentence [""], as in rouge.
  return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(reference: Sequence[str], hypothesis: Sequence[str]) -> set[str]:
  """The set of words on the LCS path that rouge 1.0.1's ``_recon_lcs`` reconstructs.

  Back-tracking from the end, a match steps diagonally, otherwise it steps up (drops a reference word) only
  when that keeps a strictly longer LCS, else left. The tie rule decides *which* words form the LCS, which
  matters once several sentence pairs are unioned. Iterative, so long sentences cannot hit the recursion
  limit (see `rouge_l_f1`).
  """
  n, m = len(reference), len(hypothesis)
  table = [[0] * (m + 1) for _ in range(n + 1)]
  for i in range(1, n + 1):
    row, previous = table[i], table[i - 1]
    ref_word = reference[i - 1]
    for j in range(1, m + 1):
      if ref_word == hypothesis[j - 1]:
        row[j] = previous[j - 1] + 1
      else:
        row[j] = previous[j] if previous[j] > row[j - 1] else row[j - 1]
  words = set()
  i, j = n, m
  while i > 0 and j > 0:
    if reference[i - 1] == hypothesis[j - 1]:
      words.add(reference[i - 1])
      i, j = i - 1, j - 1
    elif table[i - 1][j] > table[i][j - 1]:
      i -= 1
    else:
      j -= 1
  return words


def rouge_l_f1(prediction: str, ground_truth: str) -> float:
  """ROUGE-L F as ``rouge==1.0.1`` computes ``Rouge().get_scores([p], [g], avg=True)["rouge-l"]["f"]``.

  That package computes *summary-level* ROUGE-L over "."-separated sentences with its default
  ``exclusive=True``, which counts *distinct words*, not tokens:

  * m = number of distinct words of the reference, n = the same for the prediction;
  * LCS_u = size of the union, over every (reference sentence, prediction sentence) pair, of the set of words
    on that pair's reconstructed LCS (`_lcs_words`);
  * R = LCS_u / m, P = LCS_u / n, F = 2 * (P * R) / (P + R + 1e-8).

  So it is *not* textbook ROUGE-L: "the cat sat on the mat" vs "the cat is on the mat" gives 0.8 (4 distinct
  LCS words / 5 distinct words) rather than 5/6, and word order across sentences is ignored. Text is split into
  words on spaces only (no lowercasing, no punctuation stripping other than "."), so "Mat," != "mat".

  Returns 0.0 when either side has no sentence (empty, or only "."), where the official code catches the
  package's ValueError and returns 0.0.

  Difference from the official code: rouge 1.0.1 reconstructs the LCS recursively, so a sentence pair whose
  word counts add up to about Python's recursion limit (~1000 words without a ".") raises RecursionError,
  which the official ``except:`` turns into a score of 0.0. This implementation is iterative and returns the
  real score there.
  """
  hypothesis = _rouge_sentences(prediction)
  reference = _rouge_sentences(ground_truth)
  if not hypothesis or not reference:
    return 0.0
  m = len({w for sentence in reference for w in sentence})
  n = len({w for sentence in hypothesis for w in sentence})
  union: set[str] = set()
  for ref_sentence in reference:
    for hyp_sentence in hypothesis:
      union |= _lcs_words(ref_sentence, hyp_sentence)
  r_lcs = len(union) / m
  p_lcs = len(union) / n
  return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
  """ROUGE-L F of the official ``rouge_score`` (see `rouge_l_f1` for the exact definition)."""
  return rouge_l_f1(prediction, ground_truth)


def rouge_zh_score(prediction: str, ground_truth: str, *, cut: Callable[[str], Iterable[str]] | None = None,
                   **_: Any) -> float:
  """`rouge_l_f1` after joining the jieba words of each side with spaces (``cut`` as in `qa_f1_zh_score`)."""
  cut = _jieba_cut if cut is None else cut
  return rouge_l_f1(" ".join(cut(prediction)), " ".join(cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None,
                         **_: Any) -> float:
  """1 / (number of matched class names) if the gold class is among them, else 0 (trec, lsht).

  A class matches when its name is a substring of the prediction. Matches that are strict substrings of the
  gold class name are then discarded, reproducing the official loop exactly, including its quirk: it removes
  items from the list it iterates over, so the match right after a removed one is never examined. E.g. classes
  ["new", "york", "new york"], gold "new york", prediction "new york": "new" is removed, "york" is skipped and
  kept, the score is 1/2 rather than 1.
  """
  if all_classes is None:
    raise ValueError("classification_score needs all_classes (the task's label set), got None")
  matched = [name for name in all_classes if name in prediction]
  # Index walk equivalent to `for term in matched: ... matched.remove(term)`: after a removal the list shifts
  # left but the cursor still advances.
  index = 0
  while index < len(matched):
    term = matched[index]
    if term in ground_truth and term != ground_truth:
      matched.remove(term)
    index += 1
  if ground_truth in matched:
    return 1.0 / len(matched)
  return 0.0


def _share_of_numbers_equal(prediction: str, gold: str) -> float:
  numbers = re.findall(r"\d+", prediction)
  if not numbers:
    return 0.0
  return float(sum(1 for number in numbers if number == gold) / len(numbers))


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
  """Share of the numbers in the prediction equal to the gold paragraph id (``"Paragraph <id>"``)."""
  match = re.search(r"Paragraph (\d+)", ground_truth)
  if match is None:
    raise ValueError(f"retrieval_score: reference answer {ground_truth!r} contains no 'Paragraph <number>'")
  return _share_of_numbers_equal(prediction, match.group(1))


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
  """Share of the numbers in the prediction equal to the gold paragraph id (``"段落<id>"``)."""
  match = re.search(r"段落(\d+)", ground_truth)
  if match is None:
    raise ValueError(f"retrieval_zh_score: reference answer {ground_truth!r} contains no '段落<number>'")
  return _share_of_numbers_equal(prediction, match.group(1))


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
  """Share of the numbers in the prediction equal to the gold count (passage_count)."""
  return _share_of_numbers_equal(prediction, str(ground_truth))


def _indel_ratio(a: str, b: str) -> float:
  """2 * LCS(a, b) / (len(a) + len(b)) over characters: python-Levenshtein's / rapidfuzz's ratio."""
  previous = [0] * (len(b) + 1)
  for ch in a:
    current = [0]
    for j, other in enumerate(b, start=1):
      current.append(previous[j - 1] + 1 if ch == other else max(previous[j], current[j - 1]))
    previous = current
  return 2.0 * previous[-1] / (len(a) + len(b))


def fuzz_ratio(a: str, b: str, *, matcher: str = "difflib") -> int:
  """``fuzzywuzzy.fuzz.ratio`` (0.18.0): an integer similarity in [0, 100].

  Equal strings score 100 (checked first, so two empty strings score 100); otherwise an empty side scores 0;
  otherwise ``int(round(100 * ratio))``, where Python 3's ``round`` rounds halves to even (12.5 -> 12).

  Args:
    matcher: which ``ratio`` fuzzywuzzy uses. ``"difflib"`` (default, the official LaCache environment, which
      has no python-Levenshtein): ``difflib.SequenceMatcher(None, a, b).ratio()``, i.e. Ratcliff/Obershelp
      2*M/T with difflib's default auto-junk heuristic (for ``len(b) >= 200``). ``"indel"``: what fuzzywuzzy
      uses when python-Levenshtein is installed, ``Levenshtein.ratio`` = 2*LCS/T; this is also
      ``rapidfuzz.fuzz.ratio / 100`` (rapidfuzz itself returns an unrounded float). The two differ when the
      greedy longest-block matching of difflib misses the longest common subsequence.
  """
  if a == b:
    return 100
  if not a or not b:
    return 0
  if matcher == "difflib":
    ratio = difflib.SequenceMatcher(None, a, b).ratio()
  elif matcher == "indel":
    ratio = _indel_ratio(a, b)
  else:
    raise ValueError(f"fuzz_ratio: matcher must be 'difflib' or 'indel', got {matcher!r}")
  return int(round(100 * ratio))


def code_sim_score(prediction: str, ground_truth: str, *, matcher: str = "difflib", **_: Any) -> float:
  """Edit similarity of the first code line of the prediction with the gold next line (lcc, repobench-p).

  The prediction's leading newlines are stripped; its first line containing none of "`", "#" and "//" is
  compared (an empty string if there is none); the score is ``fuzz_ratio(line, ground_truth) / 100``. The gold
  line is used as is. ``matcher`` is documented at `fuzz_ratio`.
  """
  line = ""
  for candidate in prediction.lstrip("\n").split("\n"):
    if "`" not in candidate and "#" not in candidate and "//" not in candidate:
      line = candidate
      break
  return fuzz_ratio(line, ground_truth, matcher=matcher) / 100


TASK_METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
"""Task -> per-reference metric (``dataset2metric`` of the official ``eval.py``)."""


# --------------------------------------------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------------------------------------------


def score_example(task: str, prediction: str, answers: Sequence[str],
                  all_classes: Sequence[str] | None = None) -> float:
  """One example's score in [0, 1]: the task metric's maximum over the reference answers (0 if none).

  For `FIRST_LINE_TASKS` the prediction is cut to its `first_line` first.
  """
  metric = TASK_METRICS[check_task(task)]
  if isinstance(answers, str):
    raise TypeError(f"answers must be a sequence of reference strings, got the string {answers!r:.60}")
  if task in FIRST_LINE_TASKS:
    prediction = first_line(prediction)
  score = 0.0
  for ground_truth in answers:
    score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
  return score


def _check_lengths(name: str, predictions: Sequence[Any], other: Sequence[Any], other_name: str) -> None:
  if not predictions:
    raise ValueError(f"{name}: no predictions to score")
  if len(predictions) != len(other):
    raise ValueError(f"{name}: {len(predictions)} predictions but {len(other)} {other_name}")


def score_task(task: str, predictions: Sequence[str], answers_list: Sequence[Sequence[str]],
               all_classes: Sequence[str] | None = None, *, ndigits: int | None = 2) -> float:
  """The official per-task score: mean over examples of `score_example`, x100.

  Args:
    task: a LongBench task name.
    predictions: one decoded output per example.
    answers_list: the reference answers of each example.
    all_classes: the task's label set (needed by trec and lsht; the official ``eval.py`` takes it from the last
      line of the prediction file and uses it for every example).
    ndigits: round the result as the official code does (2); None for the unrounded value.

  Raises:
    ValueError: unknown task, no predictions, or a length mismatch (the official code would divide by zero or
      silently ``zip``-truncate).
  """
  _check_lengths("score_task", predictions, answers_list, "answer lists")
  total = 0.0
  for prediction, answers in zip(predictions, answers_list):
    total += score_example(task, prediction, answers, all_classes)
  score = 100 * total / len(predictions)
  return score if ndigits is None else round(score, ndigits)


def length_bucket(length: int) -> str:
  """The LongBench-E bucket of an example's ``length``: "0-4k" (< 4000), "4-8k" (< 8000) or "8k+"."""
  if length < 4000:
    return "0-4k"
  if length < 8000:
    return "4-8k"
  return "8k+"


def score_task_e(task: str, predictions: Sequence[str], answers_list: Sequence[Sequence[str]],
                 lengths: Sequence[int], all_classes: Sequence[str] | None = None, *,
                 ndigits: int | None = 2) -> dict[str, float]:
  """The official LongBench-E per-task score: {bucket: mean x100 over the examples in that bucket}.

  Uses ``numpy.mean`` (pairwise summation) and numpy rounding as the official ``scorer_e``, so values match to
  the last digit. An empty bucket is NaN, as officially, but without numpy's "mean of empty slice" warning.
  """
  _check_lengths("score_task_e", predictions, answers_list, "answer lists")
  _check_lengths("score_task_e", predictions, lengths, "lengths")
  buckets: dict[str, list[float]] = {name: [] for name in LENGTH_BUCKETS}
  for prediction, answers, length in zip(predictions, answers_list, lengths):
    buckets[length_bucket(length)].append(score_example(task, prediction, answers, all_classes))
  result = {}
  for name, scores in buckets.items():
    if not scores:
      result[name] = math.nan
      continue
    value = 100 * np.mean(scores)
    result[name] = float(value if ndigits is None else round(value, ndigits))
  return result


def _as_record(record: PredictionRecord | Mapping[str, Any]) -> PredictionRecord:
  if isinstance(record, PredictionRecord):
    return record
  all_classes = record.get("all_classes")
  return PredictionRecord(pred=record["pred"], answers=tuple(record["answers"]),
                          all_classes=None if all_classes is None else tuple(all_classes),
                          length=record.get("length"))


def score_longbench(results_by_task: Mapping[str, Sequence[PredictionRecord | Mapping[str, Any]]], *,
                    longbench_e: bool = False, ndigits: int | None = 2) -> dict[str, Any]:
  """Scores every task and adds the unweighted average, as LaCache's ``eval.py``.

  Args:
    results_by_task: ``{task: records}``; a record is a `PredictionRecord` or a dict in the official
      prediction-file format (``pred``, ``answers``, ``all_classes``, ``length``). As officially, the
      ``all_classes`` of a task's last record is used for all its records.
    longbench_e: score by length bucket (`score_task_e`); each record then needs ``length``.
    ndigits: rounding of each task score (the official 2, or None).

  Returns:
    ``{task: score, ..., "average_score": mean of the task scores}`` with tasks in sorted order; the average is
    not rounded (as in LaCache). With ``longbench_e``, each task maps to ``{bucket: score}`` and
    ``"average_score"`` maps each bucket to the mean over the tasks whose bucket is non-empty (NaN if none).
  """
  if not results_by_task:
    raise ValueError("score_longbench: results_by_task is empty")
  scores: dict[str, Any] = {}
  for task in sorted(results_by_task):
    records = [_as_record(r) for r in results_by_task[task]]
    if not records:
      raise ValueError(f"score_longbench: task {task!r} has no records")
    predictions = [r.pred for r in records]
    answers_list = [r.answers for r in records]
    all_classes = records[-1].all_classes
    if longbench_e:
      missing = [i for i, r in enumerate(records) if r.length is None]
      if missing:
        raise ValueError(f"score_longbench(longbench_e=True): task {task!r} record {missing[0]} has no 'length'")
      lengths = [r.length for r in records]
      scores[task] = score_task_e(task, predictions, answers_list, lengths, all_classes, ndigits=ndigits)
    else:
      scores[task] = score_task(task, predictions, answers_list, all_classes, ndigits=ndigits)
  if longbench_e:
    average = {}
    for bucket in LENGTH_BUCKETS:
      values = [s[bucket] for s in scores.values() if not math.isnan(s[bucket])]
      average[bucket] = sum(values) / len(values) if values else math.nan
    scores["average_score"] = average
  else:
    scores["average_score"] = sum(scores.values()) / len(scores)
  return scores
