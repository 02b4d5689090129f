"""The one protocol every hardware-design system asks a language model through.

`Backend.generate(prompts, sampling) -> [[Completion] * sampling.n] * len(prompts)`. A prompt is either raw
text (completions-style: the text is continued as is, which is what budget forcing needs) or a chat, a sequence
of `{"role": ..., "content": ...}` messages (chat-style: the backend applies its chat template). Backends:

  - the local lacax model (`lacax.hw.backends.local`), any cache policy, batched;
  - an OpenAI-compatible HTTP client (`lacax.hw.backends.openai_http`), e.g. against `lacax serve`;
  - scripted / replay backends for tests (`lacax.hw.backends.scripted`);
  - an oracle that returns reference solutions to validate a harness (`lacax.hw.backends.oracle`).

Optional capabilities are declared, not guessed: `capabilities` holds "raw_prefix" (continuing inside the
model's own output, for ScaleRTL's budget forcing), "logprobs" and "embeddings". A caller that needs one checks
`require(backend, "raw_prefix")`, which names the backend and the missing capability.

Every result records `describe()` (which backend, which model or URL) beside the sampling parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence, Union, runtime_checkable

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, Sequence[Message]]

FINISH_REASONS = ("stop", "length")
CAPABILITIES = ("raw_prefix", "logprobs", "embeddings")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How completions are drawn (the fields of the OpenAI completions API that lacax uses).

  Attributes:
    n: completions per prompt.
    temperature: 0 for greedy decoding.
    top_p: nucleus sampling mass (1.0 = no limit).
    max_tokens: new tokens per completion.
    stop: strings that end a completion; the stop string itself is not part of the text.
    seed: the seed of the first completion; completion j of a prompt uses seed + j, so results reproduce.
    logprobs: return the log-probability of every generated token (backends with "logprobs").
  """

  n: int = 1
  temperature: float = 0.0
  top_p: float = 1.0
  max_tokens: int = 512
  stop: tuple[str, ...] = ()
  seed: int = 0
  logprobs: bool = False

  def __post_init__(self):
    if not isinstance(self.n, int) or self.n < 1:
      raise ValueError(f"sampling.n={self.n!r} must be an integer >= 1")
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature={self.temperature!r} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p={self.top_p!r} must be in (0, 1]")
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"sampling.max_tokens={self.max_tokens!r} must be an integer >= 1")
    if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
      raise ValueError(f"sampling.stop={self.stop!r} must be a tuple of non-empty strings")
    object.__setattr__(self, "stop", tuple(self.stop))

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Completion:
  """One generated continuation.

  Attributes:
    text: the generated text (without the prompt and without a matched stop string).
    finish_reason: "stop" (a stop string or the end-of-sequence token) or "length" (max_tokens reached).
    tokens: the generated token ids, where the backend knows them (None for text-only backends).
    logprobs: one log-probability per generated token, when `Sampling.logprobs` was asked of a backend that
      has the "logprobs" capability; None otherwise.
  """

  text: str
  finish_reason: str = "stop"
  tokens: tuple[int, ...] | None = None
  logprobs: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.finish_reason not in FINISH_REASONS:
      raise ValueError(f"completion.finish_reason={self.finish_reason!r} must be one of {FINISH_REASONS}")


@runtime_checkable
class Backend(Protocol):
  """What every backend provides. `generate` returns, per prompt, a list of `sampling.n` completions."""

  capabilities: frozenset[str]

  def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[list[Completion]]:
    ...

  def describe(self) -> dict[str, Any]:
    """What produced the completions (kind, model, URL, ...), recorded with every result."""
    ...


class CapabilityError(ValueError):
  """A caller needs a capability (raw-prefix continuation, log-probs, embeddings) the backend lacks."""


def require(backend: Backend, capability: str) -> None:
  """Raises CapabilityError naming the backend and the capability unless the backend has it."""
  if capability not in CAPABILITIES:
    raise ValueError(f"capability={capability!r} is not one of {CAPABILITIES}")
  if capability not in getattr(backend, "capabilities", frozenset()):
    raise CapabilityError(f"backend {backend.describe()} does not provide {capability!r} "
                          f"(it has {sorted(getattr(backend, 'capabilities', ()))})")


def is_chat(prompt: Prompt) -> bool:
  """True for a chat (a sequence of role/content messages), False for raw text; anything else is an error."""
  if isinstance(prompt, str):
    return False
  if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) and "role" in m and "content" in m
                                          for m in prompt):
    return True
  raise TypeError(f"prompt {prompt!r:.80} must be a string or a sequence of {{'role', 'content'}} messages")


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """Cuts `text` before the earliest stop string; returns (text, whether a stop string was found)."""
  cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)
