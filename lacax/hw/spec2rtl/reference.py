"""Reference stage outputs of the shipped specs, and the backends built on them (tests, CI, harness checks).

Each shipped spec `specs/<name>/` has `reference/plan.json` ({"summary", "subfunctions": [info dicts],
"descriptions": {name: text}}) and, per sub-function, `<sub>.pseudo.txt`, `<sub>.py`, `<sub>.cpp` and `<sub>.x`
(DSLX): a plan and code that pass every stage check, written by hand for lacax.

  `reference_backend()`  a scripted backend that answers every role prompt from the references (the tag line of
                         `roles` says which role, spec and sub-function is asked): the Summarizer the summary,
                         the Decomposer the plan, the Verifier PASS, each coder the reference code of its stage,
                         the prompt optimiser the instructions with the failure appended, the error analyser a
                         rule (an interface / width error -> path 1, anything else -> path 3). A run on it
                         passes with zero interventions: it checks the pipeline and the tools, not a model.
  `PlantedBackend`       wraps any backend and answers chosen (role, sub-function) prompts with planted texts
                         first (bugs, wrong plans, analyses), in order; the rest goes to the inner backend.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

from lacax.hw.backends.scripted import ScriptedBackend
from lacax.hw.spec2rtl import roles
from lacax.hw.spec2rtl import spec as spec_lib

FILES = {"pseudocode": "pseudo.txt", "python": "py", "cpp": "cpp", "hls": "x"}


@dataclasses.dataclass(frozen=True)
class Reference:
  plan: dict[str, Any]
  code: dict[tuple[str, str], str]  # (sub-function, stage) -> text


@functools.cache
def _load(name: str) -> Reference | None:
  folder = os.path.join(spec_lib.SPECS_DIR, name, "reference")
  if not os.path.isfile(os.path.join(folder, "plan.json")):
    return None
  with open(os.path.join(folder, "plan.json"), encoding="utf-8") as f:
    plan = json.load(f)
  code = {}
  for sub in plan["subfunctions"]:
    for stage, ext in FILES.items():
      with open(os.path.join(folder, f"{sub['name']}.{ext}"), encoding="utf-8") as f:
        code[(sub["name"], stage)] = f.read()
  return Reference(plan, code)


def load(spec: spec_lib.Spec | str) -> Reference | None:
  """The references of a shipped spec (by name, or a Spec whose text is the shipped one), else None."""
  name = spec if isinstance(spec, str) else spec.name
  if name not in spec_lib.shipped_names():
    return None
  if not isinstance(spec, str) and spec.text != spec_lib.shipped(name).text:
    return None  # a user's own file that reuses a shipped name has no references
  return _load(name)


def reference_answer(prompt: Any, j: int = 0) -> str:
  """The reference answer to one role prompt (see the module docstring)."""
  del j
  tag = roles.parse_tag(prompt)
  if tag is None:
    return ""
  ref = _load(tag["spec"]) if tag["spec"] in spec_lib.shipped_names() else None
  role, sub = tag["role"], tag["subfunction"]
  if role == "prompt_optimizer":
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    failure = text.split("it failed:\n", 1)[-1].splitlines()[0][:300] if "it failed:\n" in text else ""
    return roles.read_instructions(prompt) + f"\nCheck every known answer before answering; last time: {failure}"
  if role == "error_analyzer":
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    body = text.split("failed after", 1)[-1].split("Where does the error come from?", 1)[0]  # the error only
    if "does not fit" in body or "interface" in body:
      return json.dumps({"path": 1, "target": None, "reason": "the output does not fit the planned interface"})
    return json.dumps({"path": 3, "target": None, "reason": "the current sub-function's code is wrong"})
  if ref is None:
    return ""
  if role == "summarizer":
    return ref.plan["summary"]
  if role == "decomposer":
    return "```json\n" + json.dumps(ref.plan["subfunctions"], indent=1) + "\n```"
  if role == "describer":
    return "```json\n" + json.dumps(ref.plan["descriptions"], indent=1) + "\n```"
  if role == "verifier":
    return "PASS"
  stage = tag["stage"]
  code = ref.code.get((sub, stage))
  if code is None:
    return ""
  return f"```{roles.FENCE[stage]}\n{code}```"


def reference_backend() -> ScriptedBackend:
  """The reference-replaying scripted backend (every shipped spec passes on it with zero interventions)."""
  return ScriptedBackend(default=reference_answer, name="reference")


class PlantedBackend:
  """Answers (role, sub-function) prompts with planted texts first, in order; everything else from `inner`.

  `plants` maps (role, sub-function or None) to a list of answers; `used` records each planted answer given.
  """

  def __init__(self, inner, plants: Mapping[tuple[str, str | None], Sequence[str]]):
    self.inner = inner
    self.plants = {k: list(v) for k, v in plants.items()}
    self.capabilities = getattr(inner, "capabilities", frozenset())
    self.used: list[tuple[str, str | None]] = []

  def generate(self, prompts, sampling):
    out = []
    for p in prompts:
      tag = roles.parse_tag(p) or {}
      key = (tag.get("role"), tag.get("subfunction"))
      queue = self.plants.get(key)
      if queue:
        from lacax.hw.backends.base import Completion  # pylint: disable=g-import-not-at-top
        self.used.append(key)
        out.append([Completion(queue.pop(0))] * sampling.n)
      else:
        out.extend(self.inner.generate([p], sampling))
    return out

  def describe(self):
    return {"kind": "planted", "inner": self.inner.describe()}
