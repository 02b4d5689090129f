"""LongBench prompts: the official template filled in, and the middle truncation of `pred.py`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from lacax.eval.longbench.tasks import PROMPT_TEMPLATES, check_task
from lacax.eval.longbench.data import LongBenchExample


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
