"""What an ACT task is: `Task` (named calibration and evaluation splits of zero-shot `Example`s) and the
multiple-choice item with its two prompt formats (the reference's lettered one and lacax's cloze one)."""

from __future__ import annotations

import dataclasses

import numpy as np

from lacax.eval.zero_shot import Example

KINDS = ("classification", "multiple_choice")
LETTERS = "ABCDEFG"


@dataclasses.dataclass(frozen=True)
class Task:
  """A named task with disjoint calibration and evaluation splits."""

  name: str
  kind: str
  calibration: tuple[Example, ...]
  evaluation: tuple[Example, ...]

  @property
  def chance(self) -> float:
    """Expected accuracy of a uniform guess over each example's candidates."""
    examples = self.evaluation or self.calibration
    return float(np.mean([1.0 / len(e.candidates) for e in examples])) if examples else 0.0


# --- multiple-choice items and their prompt formats -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MCItem:
  """A multiple-choice question before formatting.

  Attributes:
    instruction: the task instruction (first paragraph of the prompt).
    stem: the question text.
    options: the option texts.
    label: index of the correct option.
    lead_in: "options" scoring only: text after "Answer:" that the option continues (e.g. " The capital of
      France is"); empty for the reference data sets.
    option_prefix: "options" scoring only: what joins the prompt and the option (" " for words; "" when the
      lead-in already ends with a space, as before numbers, whose digits the tokenizer splits off).
  """

  instruction: str
  stem: str
  options: tuple[str, ...]
  label: int
  lead_in: str = ""
  option_prefix: str = " "


def format_mc(item: MCItem, scoring: str, task: str) -> Example:
  """The reference's prompt ("stem\\nA. ...\\nB. ...\\nAnswer:") or the cloze prompt for "options" scoring."""
  if scoring in ("generate", "letters"):
    if len(item.options) > len(LETTERS):
      raise ValueError(f"task {task!r}: {len(item.options)} options exceed the {len(LETTERS)} letters")
    body = item.stem + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(item.options)) + "\nAnswer:"
    prompt = item.instruction + "\n\n" + body
    candidates = tuple(LETTERS[:len(item.options)])
  elif scoring == "options":
    prompt = (f"{item.instruction}\n\n{item.stem}\nOptions: {', '.join(item.options)}.\n"
              f"Answer:{item.lead_in}")
    candidates = tuple(item.option_prefix + o for o in item.options)
  else:
    raise ValueError(f"scoring={scoring!r} does not apply to multiple choice; expected 'generate', 'letters' "
                     "or 'options'")
  return Example(prompt=prompt, label=item.label, candidates=candidates, scoring=scoring, task=task)
