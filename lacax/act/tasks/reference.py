"""The reference's data sets (GATECH-EIC/ACT, `utils/data_utils.py`), read from local JSONL files: the data
tables (instruction, template, label words and evaluation split of each data set, verbatim) and their loader.
The quirks the reference has and lacax keeps are listed in `lacax.act.tasks`."""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from typing import Any, Callable, Mapping, Sequence

from lacax import io as lacax_io
from lacax.act.tasks.base import LETTERS, MCItem, Task, format_mc
from lacax.eval.zero_shot import Example


@dataclasses.dataclass(frozen=True)
class ClassificationFormat:
  """A reference classification data set: prompt = instruction + template.format(**record)."""

  name: str
  instruction: str
  template: str
  labels: tuple[str, ...]
  label_key: str = "label"
  evaluation_split: str = "validation"

  def example(self, record: Mapping[str, Any], strip_trailing_space: bool = False) -> Example:
    try:
      text = self.template.format(**record)
      label = int(record[self.label_key])
    except KeyError as e:
      raise ValueError(f"{self.name} record lacks field {e.args[0]!r} (has {sorted(record)})") from None
    prompt = self.instruction + text
    if strip_trailing_space:
      prompt = prompt.rstrip(" ")
    return Example(prompt=prompt, label=label, candidates=self.labels, scoring="label_words", task=self.name)


def _classification(name, instruction, template, labels, label_key="label", evaluation_split="validation"):
  return ClassificationFormat(name, instruction, template, tuple(labels), label_key, evaluation_split)


SST2_INSTRUCTION = ("Classify the sentiment of the user's message into one of the following categories:"
               "'positive' or 'negative'.\n\n")

CLASSIFICATION_FORMATS: dict[str, ClassificationFormat] = {f.name: f for f in (
    _classification("sst2", SST2_INSTRUCTION, "Sentence: {sentence} \nSentiment: ", [" negative", " positive"]),
    _classification(
        "sst5", "Classify the sentiment of the user's message into one of the following categories:'terrible', "
        "'negative', 'neutral', 'positive', or 'great'.\n\n", "Sentence: {text} \nSentiment: ",
        [" terrible", " negative", " neutral", " positive", " great"]),
    _classification(
        "MR", "Classify the sentiment of the movie's review into one of the following categories:'positive' or "
        "'negative'.\n\n", "Review: {text} \nSentiment: ", [" negative", " positive"]),
    _classification(
        "SUBJ", "Classify the sentiment polarity of the movie's review into one of the following categories: "
        "'subjective' or 'object'.\n\n", "Input: {text} \nType: ", [" objective", " subjective"],
        evaluation_split="test"),
    _classification(
        "AGNews", "Classify the news articles into the categories of 'World', 'Sports', 'Business', or "
        "'Technology'.\n\n", "Article: {text} \nCategory: ", [" World", " Sports", " Business", " Technology"],
        evaluation_split="test"),
    _classification(
        "TREC", "Classify the given questions into the following categories of 'Description', 'Entity', "
        "'Expression', 'Person', 'Number', or 'Location'.\n\n", "Question: {text} \nType: ",
        [" Description", " Entity", " Expression", " Person", " Number", " Location"], label_key="coarse_label",
        evaluation_split="test"),
    _classification(
        "CB", "Read the following paragraph and determine if the hypothesis is true.\n\n",
        "Premise: {premise} Hypothesis: {hypothesis}. Answer: ", ["Yes", "No", "Maybe"]),
    _classification(
        "BoolQ", "Read the text and answer the question by True or False.\n\n",
        "Text: {passage} Question: {question}? \nAnswer: ", [" False", " True"]),
    _classification(
        "DBPedia", "Classify the given text into one of the most relevant categories: 'company', 'school', "
        "'artist', 'sport', 'politics', 'transportation', 'building', 'nature', 'village', 'animal', 'plant', "
        "'album', 'film', or 'book'.\n\n", "Input: {content} \nType: ",
        [" company", " school", " artist", " sport", " politics", " transportation", " building", " nature",
         " village", " animal", " plant", " album", " film", " book"], evaluation_split="test"),
)}


def _answer_key_index(key: Any) -> int:
  """ARC / OpenBookQA / CommonsenseQA answer keys: a letter "A".."G", or a 1-based digit (some ARC rows)."""
  key = str(key).strip()
  if key in LETTERS:
    return LETTERS.index(key)
  if key.isdigit():
    return int(key) - 1
  raise ValueError(f"answerKey {key!r} is neither a letter A-G nor a 1-based digit")


def _hellaswag(r):
  return r["ctx"], r["endings"], int(r["label"])


def _arc(r):
  return r["question"], r["choices"]["text"], _answer_key_index(r["answerKey"])


def _piqa(r):
  return r["goal"], [r["sol1"], r["sol2"]], int(r["label"])


def _openbookqa(r):
  return r["question_stem"], r["choices"]["text"], _answer_key_index(r["answerKey"])


def _copa(r):
  return f"{r['premise']} What is the {r['question']}?", [r["choice1"], r["choice2"]], int(r["label"])


@dataclasses.dataclass(frozen=True)
class MultipleChoiceFormat:
  """A reference multiple-choice data set: `parse(record) -> (stem, options, label)`."""

  name: str
  instruction: str
  parse: Callable[[Mapping[str, Any]], tuple[str, Sequence[str], int]]
  evaluation_split: str = "validation"

  def item(self, record: Mapping[str, Any]) -> MCItem:
    try:
      stem, options, label = self.parse(record)
    except KeyError as e:
      raise ValueError(f"{self.name} record lacks field {e.args[0]!r} (has {sorted(record)})") from None
    return MCItem(self.instruction, stem, tuple(options), label)


ANSWER_INSTRUCTION = "Generate the correct answer to the following question."
MULTIPLE_CHOICE_FORMATS: dict[str, MultipleChoiceFormat] = {f.name: f for f in (
    MultipleChoiceFormat("hellaswag", "Complete the following sentence with an appropriate ending.", _hellaswag),
    MultipleChoiceFormat("ARCE", ANSWER_INSTRUCTION, _arc),
    MultipleChoiceFormat("ARCC", ANSWER_INSTRUCTION, _arc),
    MultipleChoiceFormat("PIQA", "Generate the correct solution to accomplish the following goal.", _piqa),
    MultipleChoiceFormat("OB", "Generate the most appropriate answer to the following question.", _openbookqa),
    MultipleChoiceFormat("COPA", ANSWER_INSTRUCTION, _copa),
    MultipleChoiceFormat("CQA", ANSWER_INSTRUCTION, _arc),
)}


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Records of a JSONL file (blank lines skipped); errors (`lacax.errors.DataError`) name the file and line."""
  return [record for _, record in lacax_io.iter_jsonl(path)]


def reference_example(name: str, record: Mapping[str, Any], *, scoring: str | None = None,
                      strip_trailing_space: bool = False) -> Example:
  """One record of a reference data set as an `Example` (scoring defaults to the reference's)."""
  if name in CLASSIFICATION_FORMATS:
    if scoring not in (None, "label_words"):
      raise ValueError(f"scoring={scoring!r}: classification data set {name!r} is scored by 'label_words'")
    return CLASSIFICATION_FORMATS[name].example(record, strip_trailing_space)
  if name in MULTIPLE_CHOICE_FORMATS:
    return format_mc(MULTIPLE_CHOICE_FORMATS[name].item(record), scoring or "generate", name)
  raise ValueError(f"data set {name!r} is unknown; expected one of "
                   f"{sorted(CLASSIFICATION_FORMATS) + sorted(MULTIPLE_CHOICE_FORMATS)}")


def load_reference_task(name: str, data_dir: str, *, num_calibration: int = 900, num_evaluation: int = 0,
                        seed: int = 42, scoring: str | None = None, strip_trailing_space: bool = False) -> Task:
  """A reference data set from `<data_dir>/<name>/train.jsonl` and `<data_dir>/<name>/<evaluation split>.jsonl`.

  Args:
    name: a key of `CLASSIFICATION_FORMATS` or `MULTIPLE_CHOICE_FORMATS`.
    data_dir: the folder holding one sub-folder per data set.
    num_calibration: train records sampled (seeded) for calibration; all of them if fewer.
    num_evaluation: evaluation records kept (the first ones); 0 = all.
    seed: sampling seed.
    scoring: None for the reference's ("label_words" / "generate"), or "letters" / "options" for MC.
    strip_trailing_space: drop the template's trailing space (for byte-level BPE tokenizers).
  """
  fmt = CLASSIFICATION_FORMATS.get(name) or MULTIPLE_CHOICE_FORMATS.get(name)
  if fmt is None:
    reference_example(name, {})  # raises the unknown-name error
  folder = os.path.join(data_dir, name)
  train = read_jsonl(os.path.join(folder, "train.jsonl"))
  evaluation = read_jsonl(os.path.join(folder, f"{fmt.evaluation_split}.jsonl"))
  calibration = random.Random(seed).sample(train, min(num_calibration, len(train)))
  if num_evaluation:
    evaluation = evaluation[:num_evaluation]
  make = functools.partial(reference_example, name, scoring=scoring, strip_trailing_space=strip_trailing_space)
  kind = "classification" if name in CLASSIFICATION_FORMATS else "multiple_choice"
  return Task(name, kind, tuple(map(make, calibration)), tuple(map(make, evaluation)))
