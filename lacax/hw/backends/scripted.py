"""Scripted and replay backends: deterministic canned completions, for tests, CI and re-scoring old runs.

`ScriptedBackend` answers from a script:

  by prompt  `responses={prompt key: [completion, ...]}`: completion j of a prompt is entry j of its list
             (cycling when n exceeds it); a prompt key is the raw text, or for a chat `prompt_key(messages)`
             (canonical JSON of the messages);
  by order   `sequence=[completion, ...]`: consumed one per requested completion in call order (prompt by
             prompt, sample by sample); running out is an error;
  fallback   `default=callable(prompt, j) -> str` for anything the script does not cover (else KeyError).

Stop strings are applied like a real backend (the text is cut before the first one, finish_reason "stop");
`max_tokens` counts whitespace-separated words here (a text-only backend has no tokenizer), finish_reason
"length" when it cuts.

Replay files are JSONL, one record per prompt: `{"prompt": <text or messages>, "completions": [<text>, ...]}`
(optional `"finish_reasons"`); `write_replay` writes them (e.g. from a real model's run via
`RecordingBackend`) and `ReplayBackend.from_file` answers from them by prompt.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Mapping, Sequence

from lacax.hw.backends.base import Completion, Prompt, Sampling, is_chat, truncate_at_stop


def prompt_key(prompt: Prompt) -> str:
  """The script key of a prompt: raw text as is; a chat as canonical JSON of its messages."""
  if is_chat(prompt):
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in prompt], sort_keys=True,
                      ensure_ascii=False)
  return prompt


def _finish(text: str, sampling: Sampling) -> Completion:
  text, stopped = truncate_at_stop(text, sampling.stop)
  words = text.split(" ")
  if len(text.split()) > sampling.max_tokens:
    kept, count = [], 0
    for w in words:
      count += bool(w.strip())
      if count > sampling.max_tokens:
        break
      kept.append(w)
    return Completion(" ".join(kept), "length")
  return Completion(text, "stop")


class ScriptedBackend:
  """Canned completions by prompt, by call order, or from a fallback function (see the module docstring)."""

  def __init__(self, responses: Mapping[str, Sequence[str]] | None = None, sequence: Sequence[str] | None = None,
               default: Callable[[Prompt, int], str] | None = None,
               capabilities: frozenset[str] = frozenset({"raw_prefix"}), name: str = "scripted"):
    if responses is None and sequence is None and default is None:
      raise ValueError("ScriptedBackend needs responses, sequence or default")
    self.responses = {k: list(v) for k, v in (responses or {}).items()}
    for k, v in self.responses.items():
      if not v or not all(isinstance(s, str) for s in v):
        raise ValueError(f"responses[{k[:60]!r}] must be a non-empty list of strings")
    self._sequence = list(sequence) if sequence is not None else None
    self._pos = 0
    self._lock = threading.Lock()
    self.default = default
    self.capabilities = frozenset(capabilities)
    self.name = name
    self.calls: list[tuple[tuple[Prompt, ...], Sampling]] = []

  def _one(self, prompt: Prompt, j: int) -> str:
    key = prompt_key(prompt)
    if key in self.responses:
      options = self.responses[key]
      return options[j % len(options)]
    if self._sequence is not None:
      with self._lock:
        if self._pos >= len(self._sequence):
          raise IndexError(f"{self.name}: the sequence of {len(self._sequence)} completions is used up")
        self._pos += 1
        return self._sequence[self._pos - 1]
    if self.default is not None:
      return self.default(prompt, j)
    raise KeyError(f"{self.name}: no scripted completion for prompt {key[:120]!r}")

  def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[list[Completion]]:
    self.calls.append((tuple(prompts), sampling))
    return [[_finish(self._one(p, j), sampling) for j in range(sampling.n)] for p in prompts]

  def describe(self) -> dict[str, Any]:
    return {"kind": self.name, "prompts": len(self.responses),
            "sequence": None if self._sequence is None else len(self._sequence)}


def read_replay(path: str) -> dict[str, list[str]]:
  """{prompt key: completions} from a replay JSONL file."""
  out: dict[str, list[str]] = {}
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not JSON ({e})") from None
      if not isinstance(rec, dict) or "prompt" not in rec or not isinstance(rec.get("completions"), list):
        raise ValueError(f"{path}:{i}: expected {{'prompt': ..., 'completions': [...]}}, got keys "
                         f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
      out.setdefault(prompt_key(rec["prompt"]), []).extend(rec["completions"])
  return out


def write_replay(path: str, prompts: Sequence[Prompt], completions: Sequence[Sequence[Completion | str]]) -> None:
  """Writes a replay file (atomically): one record per prompt."""
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for p, cs in zip(prompts, completions):
      texts = [c.text if isinstance(c, Completion) else c for c in cs]
      reasons = [c.finish_reason if isinstance(c, Completion) else "stop" for c in cs]
      f.write(json.dumps({"prompt": list(p) if is_chat(p) else p, "completions": texts,
                          "finish_reasons": reasons}, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


class ReplayBackend(ScriptedBackend):
  """Answers from a replay file, by prompt."""

  def __init__(self, responses: Mapping[str, Sequence[str]], path: str | None = None):
    super().__init__(responses=responses, name="replay")
    self.path = path

  @classmethod
  def from_file(cls, path: str) -> "ReplayBackend":
    return cls(read_replay(path), path)

  def describe(self) -> dict[str, Any]:
    return {"kind": "replay", "path": self.path, "prompts": len(self.responses)}


class RecordingBackend:
  """Wraps a backend and keeps every (prompt, completions) pair, to `save` as a replay file."""

  def __init__(self, inner):
    self.inner = inner
    self.capabilities = inner.capabilities
    self.records: list[tuple[Prompt, list[Completion]]] = []

  def generate(self, prompts, sampling):
    out = self.inner.generate(prompts, sampling)
    self.records.extend(zip(prompts, out))
    return out

  def describe(self):
    return {"kind": "recording", "inner": self.inner.describe()}

  def save(self, path: str) -> None:
    write_replay(path, [p for p, _ in self.records], [c for _, c in self.records])
