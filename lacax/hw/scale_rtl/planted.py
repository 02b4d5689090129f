"""A scripted backend with a planted bug: the first answer to each problem is a buggy draft (an injected bug of
`lacax.hw.scale_rtl.traces.BUGS`), and any continuation that carries a reflection cue is answered with the
correct design. It checks the reflection machinery end to end through the real simulator (fail -> pass), and
serves the `:tiny` job; it says nothing about any model.
"""

from __future__ import annotations

from typing import Any, Sequence

from lacax.hw.backends.scripted import ScriptedBackend
from lacax.hw.backends.base import is_chat
from lacax.hw.scale_rtl import traces as traces_lib

CUE_MARKS = ("Wait, let me check", "The simulator rejects")  # the tool-free cue, the feedback extension's


def planted_backend(problems: Sequence[Any], bug_order: Sequence[str] = tuple(traces_lib.BUGS)) -> ScriptedBackend:
  """Drafts carry the first bug of `bug_order` that applies to each problem's reference (the reference itself
  when none does); after a cue the answer is the reference (the cue ends inside an open ```verilog fence)."""
  plans = []
  for p in problems:
    draft = next((d for d in (traces_lib.BUGS[b](p.reference) for b in bug_order) if d is not None), p.reference)
    plans.append((p.description, draft, p.reference))

  def answer(prompt, j):
    del j
    text = "\n".join(m["content"] for m in prompt) if is_chat(prompt) else prompt
    for desc, draft, ref in plans:
      if desc in text:
        if any(m in text for m in CUE_MARKS):
          return ref.rstrip() + "\n```\n"
        return f"```verilog\n{draft.rstrip()}\n```\n"
    raise KeyError(f"planted backend: no problem's description is in the prompt {text[:100]!r}")

  return ScriptedBackend(default=answer, name="planted")
