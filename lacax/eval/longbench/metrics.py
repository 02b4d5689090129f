"""LongBench metrics: answer normalisation, the official per-task metrics and their aggregation
(`score_longbench`)."""

from __future__ import annotations

import collections
import difflib
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from lacax.eval.longbench.tasks import FIRST_LINE_TASKS, LENGTH_BUCKETS, check_task
from lacax.eval.longbench.data import PredictionRecord
from lacax.eval.longbench.prompts import first_line


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
