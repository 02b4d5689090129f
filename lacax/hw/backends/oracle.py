"""The oracle backend: answers every problem with its reference solution, to validate a harness.

A harness that is right scores the oracle 100% on valid items; every item it fails is either a benchmark bug
or a simulator limit, and the harness says which (the problem's `known_issues` beside the measured failure).
Prompts are matched to problems by the harness's own rendering (`lacax.hw.bench.problem.render_prompt`), so
the oracle sees exactly what a model would.
"""

from __future__ import annotations

from typing import Any, Sequence

from lacax.hw.backends.base import Completion, Prompt, Sampling
from lacax.hw.backends.scripted import prompt_key
from lacax.hw.bench import problem as problem_lib


class OracleBackend:
  """Returns `problem.reference_answer()` (in a ```verilog fence) for the prompt of each problem.

  Args:
    problems: the problems it knows.
    style: the prompt style the harness renders (`render_prompt`).
    system: the system text override the harness uses, if any.
    fence: wrap answers in a ```verilog block, as chat models answer (exercises the code extraction).
  """

  capabilities = frozenset()

  def __init__(self, problems: Sequence[problem_lib.Problem], style: str = "chat", system: str | None = None,
               fence: bool = True):
    self.fence = fence
    self._answers: dict[str, str] = {}
    for p in problems:
      key = prompt_key(problem_lib.render_prompt(p, style, system))
      if key in self._answers and self._answers[key] != p.reference_answer():
        raise ValueError(f"two problems with the same prompt but different references (e.g. {p.task_id})")
      self._answers[key] = p.reference_answer()
    self.style = style

  def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[list[Completion]]:
    out = []
    for prompt in prompts:
      key = prompt_key(prompt)
      if key not in self._answers:
        raise KeyError(f"oracle: no problem renders to the prompt {key[:120]!r}")
      text = self._answers[key]
      text = f"```verilog\n{text.rstrip()}\n```\n" if self.fence else text
      out.append([Completion(text, "stop")] * sampling.n)
    return out

  def describe(self) -> dict[str, Any]:
    return {"kind": "oracle", "problems": len(self._answers), "style": self.style}
