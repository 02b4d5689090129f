"""The (context length x needle depth) grid of passkey / NIAH prompts, its scores, tables and heatmaps.

The protocol of GATECH-EIC/LaCache `niah/pred.py`, generated offline from `lacax.eval.passkey`: every cell
(length L tokens, depth d) holds `samples_per_cell` prompts (seeds `seed`, `seed + 1`, ...) fitted to at most L
tokens with the needle at depth d; a row decodes (answer tokens without BOS) + `extra_new_tokens` tokens and
passes when the answer string occurs in the stripped output (`lacax.eval.passkey.score_passkey`).

Two tasks: "passkey" (the reference's landmark prompt) and "niah" (a RULER-style needle sentence in real prose,
`NIAH_DEFAULTS`). The job that runs the grid under several cache policies is `lacax.jobs.passkey`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lacax.eval import passkey as pk

TASKS = ("passkey", "niah")
PROTOCOLS = ("lacache", "kvpress")
"""How a NIAH prompt is built: "lacache" (the haystack in characters fitted to the token budget, the needle at
a token depth, `lacax.eval.passkey.niah_sample`) or "kvpress" (NVIDIA/kvpress
`evaluation/benchmarks/needle_in_haystack/utils.py::insert_needle_in_haystack`, see `kvpress_niah_sample`)."""

KVPRESS_CONTEXT_WRAPPER = "This is a very long story book: <book> {context} </book>."
KVPRESS_OVERHEAD_TOKENS = 150
"""kvpress's allowance for the system prompt and the question: the haystack is cut to
max_context_length - needle tokens - 150 tokens."""


@dataclasses.dataclass(frozen=True)
class GridSample:
  """One prompt of the grid.

  Attributes:
    length: the cell's context length in tokens (the column); the prompt has at most this many tokens.
    depth: the cell's nominal needle depth in [0, 1] (the row); `sample.depth` is the realised one.
    seed: the seed that drew the needle's number.
    sample: the prompt text, answer and needle placement.
    ids: the token ids fed to the model.
    new_tokens: tokens the row decodes and is scored on.
  """

  length: int
  depth: float
  seed: int
  sample: pk.NeedleSample
  ids: tuple[int, ...]
  new_tokens: int


NIAH_DEFAULTS = dict(
    task_description=("Some special magic numbers are hidden within the following text. Make sure to memorize "
                      "it. I will quiz you about the numbers afterwards."),
    template="The special magic number is: {answer}.",
    question="What is the special magic number mentioned in the provided text? The special magic number is",
    digits=7,
)
"""RULER-style single needle (niah_single): a 7-digit number in prose, asked for after the haystack."""


def niah_answer(seed: int, digits: int) -> str:
  """A `digits`-digit number drawn from `random.Random(seed)` (the global RNG is untouched)."""
  return str(random.Random(seed).randint(10 ** (digits - 1), 10 ** digits - 1))


def kvpress_niah_sample(haystack_ids: Sequence[int], *, max_context_length: int, depth: float, needle: str,
                        answer: str, question: str, encode: Callable[[str], Sequence[int]],
                        decode: Callable[[Sequence[int]], str], answer_prefix: str = "",
                        context_wrapper: str = KVPRESS_CONTEXT_WRAPPER, seed: int | None = None) -> pk.NeedleSample:
  """kvpress's needle-in-a-haystack prompt (`insert_needle_in_haystack`), as one `NeedleSample`.

  The haystack's tokens (without special tokens) are cut to ``max_context_length - len(needle tokens) - 150``;
  the needle's tokens go in at index ``int(len(haystack) * depth)`` (kvpress: ``depth / 100`` of a percentage);
  the tokens are decoded back to text and wrapped as "This is a very long story book: <book> ... </book>.".
  kvpress's pipeline then feeds context, question and answer prefix (``context + question + "\n" +
  answer_prefix`` without a chat template); here the prompt is ``context + "\n" + question`` (+ the answer
  prefix on a new line when given), which the job wraps in the chat template when `chat=True`.

  Args:
    haystack_ids: the haystack text's token ids, without BOS (encode it once for the whole grid).
    max_context_length: kvpress's max_context_length (the grid length).
    depth: the needle depth as a fraction in [0, 1].
    needle, answer, question, answer_prefix: the needle sentence, the string a correct output contains, the
      question and the answer prefix.
    encode, decode: the tokenizer without special tokens.
  """
  needle_ids = list(encode(needle))
  limit = max_context_length - len(needle_ids) - KVPRESS_OVERHEAD_TOKENS
  if limit <= 0:
    raise ValueError(f"max_context_length={max_context_length} leaves no haystack after the needle "
                     f"({len(needle_ids)} tokens) and kvpress's {KVPRESS_OVERHEAD_TOKENS}-token allowance")
  context_ids = list(haystack_ids[:limit])
  index = int(len(context_ids) * depth)
  prefix_text = decode(context_ids[:index])
  context = context_wrapper.format(context=decode(context_ids[:index] + needle_ids + context_ids[index:]))
  prompt = context + "\n" + question + ("\n" + answer_prefix if answer_prefix else "")
  offset = prompt.find(needle)
  return pk.NeedleSample(prompt=prompt, answer=answer, needle=needle, needle_offset=offset,
                         depth=index / len(context_ids) if context_ids else 0.0, depth_unit="tokens",
                         prefix_chars=len(prefix_text), filler_chars=len(decode(context_ids)), seed=seed)


def build_grid(tokenize: Callable[[str], Sequence[int]], *, task: str, lengths: Sequence[int],
               depths: Sequence[float], samples_per_cell: int, seed: int = 0, depth_unit: str = "chars",
               suffix_mode: str = "restart", extra_new_tokens: int = 1,
               answer_tokenize: Callable[[str], Sequence[int]] | None = None, haystack: str | None = None,
               needle: Mapping[str, Any] | None = None, protocol: str = "lacache",
               tokenizer=None) -> list[GridSample]:
  """Every prompt of the grid, lengths x depths x seeds, fitted to the token budgets (`pk.fit_to_tokens`).

  Args:
    tokenize: text -> the ids the model will see (chat wrapping included): lengths are counted with it.
    task: "passkey" (the reference's prompt) or "niah" (needs `haystack`).
    lengths: context lengths in tokens; each prompt has at most that many tokens.
    depths: needle depths in [0, 1].
    samples_per_cell: seeds seed, seed + 1, ... per cell (the same seeds in every cell, as the reference).
    depth_unit, suffix_mode: see `lacax.eval.passkey.niah_sample`.
    extra_new_tokens: decoded tokens beyond len(answer_tokenize(answer)): 1 with a BOS-free answer count
      reproduces the reference's count (which includes the BOS of its Llama tokenizers) and leaves room for the
      space token byte-level BPE models emit before the digits (configs/passkey.py).
    answer_tokenize: tokenizer for the answer's token count (default `tokenize`; the job passes the tokenizer
      without BOS).
    haystack: the NIAH prose.
    needle: NIAH needle settings (`NIAH_DEFAULTS` keys).
    protocol: for "niah", "lacache" or "kvpress" (`PROTOCOLS`; "kvpress" needs `tokenizer`, a
      `lacax.tokenizer.Tokenizer`, and ignores depth_unit / suffix_mode: its depth is in tokens, its haystack
      contiguous, and the task description line is left out as kvpress has none).

  Raises:
    ValueError: naming the field, for an unknown task, a depth outside [0, 1], or a length below the prompt
      without any filler.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} must be one of {list(TASKS)}")
  answer_tokenize = answer_tokenize or tokenize
  needle = {**NIAH_DEFAULTS, **(needle or {})}
  if task == "niah" and not haystack:
    raise ValueError("task='niah' needs a haystack text (haystack.path)")
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol={protocol!r} must be one of {list(PROTOCOLS)}")
  kvpress = task == "niah" and protocol == "kvpress"
  if kvpress:
    if tokenizer is None:
      raise ValueError("protocol='kvpress' needs the tokenizer (its haystack is cut and the needle inserted in tokens)")
    haystack_ids = tokenizer.encode(haystack, add_bos=False)
    encode = lambda text: tokenizer.encode(text, add_bos=False)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
  grid = []
  for length in lengths:
    for depth in depths:
      for s in range(seed, seed + samples_per_cell):
        if task == "passkey":
          make = functools.partial(pk.passkey_sample, seed=s, depth=depth, depth_unit=depth_unit,
                                   tokenize=tokenize if depth_unit == "tokens" else None, suffix_mode=suffix_mode)
        else:
          answer = niah_answer(s, int(needle["digits"]))
          make = functools.partial(
              pk.niah_sample, needle=needle["template"].format(answer=answer), answer=answer,
              question=needle["question"], depth=depth, haystack=haystack,
              task_description=needle["task_description"], suffix_mode=suffix_mode, depth_unit=depth_unit,
              tokenize=tokenize if depth_unit == "tokens" else None, seed=s)
        try:
          if kvpress:
            answer = niah_answer(s, int(needle["digits"]))
            sample = kvpress_niah_sample(haystack_ids, max_context_length=length, depth=depth,
                                         needle=needle["template"].format(answer=answer), answer=answer,
                                         question=needle["question"], encode=encode, decode=decode,
                                         answer_prefix=needle.get("answer_prefix", ""), seed=s)
            sample = dataclasses.replace(sample, num_tokens=len(tokenize(sample.prompt)))
          else:
            sample = pk.fit_to_tokens(make, length, tokenize)
        except ValueError as e:
          raise ValueError(f"grid.lengths contains {length}: {e}") from None
        new_tokens = len(answer_tokenize(sample.answer)) + extra_new_tokens
        grid.append(GridSample(length=length, depth=depth, seed=s, sample=sample, ids=tuple(tokenize(sample.prompt)),
                               new_tokens=new_tokens))
  return grid


def completion_text(tokenizer, tokens: Sequence[int], new_tokens: int) -> str:
  """The reference's answer text: the first `new_tokens` generated ids, decoded without special tokens, stripped."""
  return tokenizer.decode(list(tokens)[:new_tokens], skip_special_tokens=True).strip()


def pass_rate_grid(grid: Sequence[GridSample], correct: Sequence[bool], lengths: Sequence[int],
                   depths: Sequence[float]) -> np.ndarray:
  """[len(depths), len(lengths)] fraction of the cell's samples that passed (NaN for an empty cell)."""
  if len(grid) != len(correct):
    raise ValueError(f"{len(grid)} samples but {len(correct)} scores")
  passed = np.zeros((len(depths), len(lengths)))
  count = np.zeros((len(depths), len(lengths)))
  row = {d: i for i, d in enumerate(depths)}
  col = {n: j for j, n in enumerate(lengths)}
  for sample, ok in zip(grid, correct):
    i, j = row[sample.depth], col[sample.length]
    passed[i, j] += bool(ok)
    count[i, j] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, passed / np.maximum(count, 1), np.nan)


def length_label(n: int) -> str:
  """512 -> "512", 1024 -> "1k", 131072 -> "128k"."""
  return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def format_grid(name: str, rates: np.ndarray, lengths: Sequence[int], depths: Sequence[float]) -> str:
  """A text table: depth rows x length columns of pass rates in %, with the column means and the overall mean."""
  header = f"{'depth':>7}" + "".join(f"{length_label(n):>8}" for n in lengths) + f"{'mean':>8}"
  lines = [f"{name}: mean pass rate {100 * np.nanmean(rates):.1f}%", header]
  for i, depth in enumerate(depths):
    lines.append(f"{100 * depth:>6.0f}%" + "".join(f"{100 * r:>8.0f}" for r in rates[i]) +
                 f"{100 * np.nanmean(rates[i]):>8.1f}")
  lines.append(f"{'mean':>7}" + "".join(f"{100 * np.nanmean(rates[:, j]):>8.1f}" for j in range(len(lengths))) +
               f"{100 * np.nanmean(rates):>8.1f}")
  return "\n".join(lines)


def plot_heatmaps(rates: Mapping[str, np.ndarray], lengths: Sequence[int], depths: Sequence[float], path: str,
                  title: str) -> None:
  """One panel per policy: pass rate (%) coloured red -> green, depth on y (0% at the top), length on x."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(rates)
  width = max(3.0, 0.7 * len(lengths) + 1.5)
  fig, axes = plt.subplots(1, len(names), figsize=(width * len(names) + 1.0, 0.35 * len(depths) + 2.0),
                           squeeze=False, layout="constrained")
  image = None
  for ax, name in zip(axes[0], names):
    grid = 100 * rates[name]
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        if not math.isnan(grid[i, j]):
          ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_title(f"{name} ({np.nanmean(grid):.1f}%)")
  axes[0][0].set_ylabel("needle depth")
  fig.colorbar(image, ax=axes[0].tolist(), label="pass rate (%)", shrink=0.8)
  fig.suptitle(title)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def cells(grid: Sequence[GridSample]) -> dict[tuple[int, float], list[int]]:
  """{(length, depth): indices of the grid samples of that cell}, in grid order."""
  out: dict[tuple[int, float], list[int]] = {}
  for i, sample in enumerate(grid):
    out.setdefault((sample.length, sample.depth), []).append(i)
  return out
