"""Budget-forced reflection (ScaleRTL, arXiv 2506.05566, in the manner of s1's budget forcing, arXiv 2501.19393).

  traces = reflect(backend, prompts, Sampling(n=4, temperature=0.7, max_tokens=384), ReflectConfig(rounds=2))

Each sample is decoded in rounds. A round ends when the model closes its work: in the "module" format (no-think
answers) at `endmodule` (or the end-of-sequence token), in the "think" format at the end-of-think marker. While
rounds remain and the thinking-token budget is not spent, the close is not the end: a reflection cue built from
general RTL rules (`lacax.hw.scale_rtl.rules`) is appended and decoding continues -

  - on the local backend from the SAME KV cache (`LocalBackend.session`, `lacax.hw.backends.session`): the cue's
    tokens are a chunked prefill, nothing is prefilled again (its `counters` show it);
  - on any other backend from the raw prefix: prompt + everything so far + cue, sent again (`continue_`, e.g. a
    completions endpoint such as `lacax serve` or vLLM; chats are rendered as ChatML text for it).

It stops after `rounds` cues (N), when the budget is spent (it is never exceeded: each round may generate at most
what is left), or when a round ends without closing (its `max_tokens` ran out). N = 0 is plain sampling: one
round with the caller's own stop strings. The answer after each round is the last complete module the model has
written so far (`Trace.code_after`), so one run with N rounds also scores every N' < N (exactly, when the stop
strings include the trigger, as the configs do: round N' is then the same tokens in both runs).

The tool-free cue is ScaleRTL's method and the default. `feedback="simulator"` is an EXTENSION, not ScaleRTL
(AutoChip-style, arXiv 2311.04887): the cue carries the simulator's verdict on the round's design (compile
errors or mismatches, from the problem's own testbench), and a design that passes ends the sample.

Tokens: generated tokens count against the budget; cue tokens are counted apart (`cue_tokens`). A backend that
returns token ids (local) or log-probabilities (asked of `openai_http`) is counted exactly; a scripted backend
in its own unit (words); any other is charged the round's whole limit, an upper bound (`counted="upper_bound"`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

from lacax.hw.backends.base import Completion, Prompt, Sampling, is_chat
from lacax.hw.scale_rtl import rules as rules_lib

FORMATS = ("module", "think")
FEEDBACK = ("none", "simulator")
CONTINUATIONS = ("auto", "kv", "text")
_MODULE_RE = re.compile(r"\bmodule\s+(\w+)\b.*?\bendmodule\b", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ReflectConfig:
  """How many reflection rounds, how many tokens, which cue.

  Attributes:
    rounds: N, the number of cues (0 = plain sampling).
    budget: thinking-token budget per sample over all rounds (0 = (rounds + 1) * sampling.max_tokens); a round
      generates at most min(sampling.max_tokens, what is left).
    format: "module" (the trigger is `endmodule`, kept in the answer) or "think" (the trigger is `think_close`,
      suppressed; after the last round the model closes its thinking and answers).
    think_close: the end-of-think marker of the "think" format.
    rules: the rule set of the cue (`lacax.hw.scale_rtl.rules.RULE_SETS`).
    cue: the cue text ("" = built from `rules` by `rules.cue`).
    feedback: "none" (tool-free, ScaleRTL) or "simulator" (the extension; needs the problems).
    answer_tokens: "think" format: tokens for the answer forced after an exhausted budget (reported apart).
    continuation: "kv" (the local backend's KV session), "text" (the raw prefix) or "auto" (kv when possible).
    chat_format: how a chat is rendered as raw text for a text continuation on a backend without `continue_`
      for chats ("chatml": SmolLM2, Qwen2).
  """

  rounds: int = 2
  budget: int = 0
  format: str = "module"
  think_close: str = "</think>"
  rules: str = "verilog_eval+extra"
  cue: str = ""
  feedback: str = "none"
  answer_tokens: int = 512
  continuation: str = "auto"
  chat_format: str = "chatml"

  def __post_init__(self):
    if not isinstance(self.rounds, int) or self.rounds < 0:
      raise ValueError(f"reflect.rounds={self.rounds!r} must be an integer >= 0")
    if not isinstance(self.budget, int) or self.budget < 0:
      raise ValueError(f"reflect.budget={self.budget!r} must be an integer >= 0 (0 = rounds+1 rounds' worth)")
    if self.format not in FORMATS:
      raise ValueError(f"reflect.format={self.format!r} must be one of {FORMATS}")
    if self.feedback not in FEEDBACK:
      raise ValueError(f"reflect.feedback={self.feedback!r} must be one of {FEEDBACK}")
    if self.continuation not in CONTINUATIONS:
      raise ValueError(f"reflect.continuation={self.continuation!r} must be one of {CONTINUATIONS}")
    if self.chat_format != "chatml":
      raise ValueError(f"reflect.chat_format={self.chat_format!r} must be 'chatml'")
    rules_lib.rules(self.rules)

  @property
  def trigger(self) -> str:
    return "endmodule" if self.format == "module" else self.think_close

  def cue_text(self) -> str:
    return self.cue or rules_lib.cue(rules_lib.rules(self.rules), self.format)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Round:
  text: str
  tokens: int
  finish_reason: str
  cue: str = ""  # the cue that followed this round ("" if none)
  cue_tokens: int = 0


@dataclasses.dataclass
class Trace:
  """One sample's rounds. `stop`: why it ended ("closed" after its last allowed round, "budget", "length" (a
  round ran out of max_tokens), or "passed" (simulator feedback only))."""

  rounds: list[Round] = dataclasses.field(default_factory=list)
  stop: str = ""
  counted: str = "exact"
  answer: Round | None = None

  @property
  def generated_tokens(self) -> int:
    return sum(r.tokens for r in self.rounds)

  @property
  def cue_tokens(self) -> int:
    return sum(r.cue_tokens for r in self.rounds)

  @property
  def text(self) -> str:
    """The whole answer: every round with the cues between them (and a forced answer)."""
    out = "".join(r.text + r.cue for r in self.rounds)
    return out + (self.answer.text if self.answer else "")

  def code_after(self, r: int | None = None, top: str | None = None) -> str:
    """The answer after round r (None = the last): the last complete module written in rounds 0..r (the
    model's own text only, never a cue), or the round's text when no module is complete (the harness then
    reports what is wrong with it)."""
    upto = self.rounds if r is None else self.rounds[:r + 1]
    texts = [x.text for x in upto] + ([self.answer.text] if self.answer and r is None else [])
    for text in reversed(texts):
      mods = [m for m in _MODULE_RE.finditer(text) if top is None or m.group(1) == top]
      if mods:
        return mods[-1].group(0) + "\n"
    return texts[-1] if texts else ""

  def to_json(self) -> dict[str, Any]:
    return {"rounds": [dataclasses.asdict(r) for r in self.rounds], "stop": self.stop, "counted": self.counted,
            "generated_tokens": self.generated_tokens, "cue_tokens": self.cue_tokens,
            "answer": dataclasses.asdict(self.answer) if self.answer else None}


def render_chatml(messages: Sequence[Mapping[str, str]]) -> str:
  """A chat as ChatML text with the assistant's turn opened (the template of SmolLM2 and Qwen2)."""
  return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def count_tokens(backend, completion: Completion, limit: int) -> tuple[int, str]:
  """(tokens the completion generated, "exact" | "words" | "upper_bound")."""
  if completion.tokens is not None:
    return len(completion.tokens), "exact"
  if completion.logprobs is not None:
    return len(completion.logprobs), "exact"
  if backend.describe().get("kind") in ("scripted", "replay", "planted"):
    return scripted_words(completion.text), "words"  # a scripted backend's max_tokens counts words
  return limit, "upper_bound"


def scripted_words(text: str) -> int:
  """Tokens as `lacax.hw.backends.scripted` counts them for max_tokens: non-blank " "-separated pieces."""
  return sum(bool(w.strip()) for w in text.split(" "))


def _unclosed_module(text: str) -> bool:
  return len(re.findall(r"\bmodule\b", text)) > len(re.findall(r"\bendmodule\b", text))


def _supports_kv(backend) -> bool:
  from lacax.cache.full import FullPolicy  # pylint: disable=g-import-not-at-top
  policy = getattr(backend, "policy", None)
  return hasattr(backend, "session") and isinstance(policy, FullPolicy) and not policy.capacity


CueFn = Callable[[int, int, "Trace"], "str | None"]  # (row, round, trace) -> cue, or None to stop the sample


def reflect(backend, prompts: Sequence[Prompt], sampling: Sampling, config: ReflectConfig = ReflectConfig(), *,
            problems: Sequence[Any] | None = None, simulator: str = "iverilog",
            cue_fn: CueFn | None = None) -> list[list[Trace]]:
  """Per prompt, `sampling.n` traces of budget-forced reflection (see the module docstring).

  Args:
    backend: any backend; the local one continues in its KV cache unless `config.continuation == "text"`.
    prompts: chats or raw text, as the harness renders them.
    sampling: n, temperature, top-p, seed, the stop strings, and max_tokens: the limit of one round.
    config: rounds, budget, format, cue.
    problems: one per prompt; needed by `feedback="simulator"` (their testbenches judge each round).
    cue_fn: overrides the cue: (row, round, trace) -> the cue text, or None to end the sample there.
  """
  if config.feedback == "simulator":
    if problems is None or len(problems) != len(prompts):
      raise ValueError("reflect.feedback='simulator' needs one problem per prompt (their testbenches)")
    cue_fn = cue_fn or simulator_cue(problems, sampling.n, simulator)
  budget = config.budget or (config.rounds + 1) * sampling.max_tokens
  rows = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
  traces = [Trace() for _ in rows]
  used = [0] * len(rows)
  kv = config.continuation == "kv" or (config.continuation == "auto" and _supports_kv(backend))
  if kv and not _supports_kv(backend):
    raise ValueError(f"reflect.continuation='kv' needs the local backend with a full cache; got "
                     f"{backend.describe()}")
  runner = (_KVRunner(backend, prompts, sampling, config, budget) if kv
            else _TextRunner(backend, prompts, sampling, config))
  base_cue = config.cue_text()
  pending: list[str | None] = [""] * len(rows)  # per row: "" first round, a cue text, or None (finished)
  for r in range(config.rounds + 1):
    cue_may_follow = r < config.rounds
    stop = tuple(sampling.stop)
    if cue_may_follow and config.trigger not in stop:
      stop += (config.trigger,)
    limits = [min(sampling.max_tokens, budget - used[b]) for b in range(len(rows))]
    go = [pending[b] is not None and limits[b] >= 1 for b in range(len(rows))]
    for b in range(len(rows)):
      if pending[b] is not None and not go[b]:
        traces[b].stop, pending[b] = "budget", None
    if not any(go):
      break
    outs = runner.run(r, [pending[b] if go[b] else None for b in range(len(rows))], limits, stop)
    for b, out in enumerate(outs):
      if out is None:
        continue
      text, n, counted = out
      used[b] += n
      comp_finish = runner.finish[b]
      if counted != "exact":
        traces[b].counted = counted
      traces[b].rounds.append(Round(text=text, tokens=n, finish_reason=comp_finish))
      if comp_finish == "length":
        traces[b].stop, pending[b] = ("budget" if used[b] >= budget else "length"), None
      elif not cue_may_follow:
        traces[b].stop, pending[b] = "closed", None
      elif used[b] >= budget:
        traces[b].stop, pending[b] = "budget", None
      else:
        cue = cue_fn(b, r, traces[b]) if cue_fn is not None else base_cue
        if cue is None:
          traces[b].stop, pending[b] = "passed", None
        else:
          if config.format == "module":  # close the answer's open ``` fence before the cue
            cue = rules_lib.close_fence(traces[b].text) + cue
          traces[b].rounds[-1].cue, traces[b].rounds[-1].cue_tokens = cue, runner.count_cue(cue)
          pending[b] = cue
  if config.format == "think":
    _force_answers(runner, traces, config)
  return [traces[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]


def _force_answers(runner, traces: list[Trace], config: ReflectConfig) -> None:
  """Think format: a sample whose budget ran out inside its thinking gets the end-of-think marker and
  `answer_tokens` to answer (s1's forced answer; counted apart from the budget)."""
  need = [t.stop in ("budget", "length") and config.think_close not in t.text for t in traces]
  if not any(need):
    return
  outs = runner.run(-1, [("\n" + config.think_close + "\n") if nd else None for nd in need],
                    [config.answer_tokens] * len(traces), tuple(runner.sampling.stop), answer=True)
  for b, out in enumerate(outs):
    if out is not None:
      traces[b].answer = Round(text=out[0], tokens=out[1], finish_reason=runner.finish[b])


class _TextRunner:
  """Rounds as text: prompt + everything so far (+ the cue) continued by the backend (re-sent each round)."""

  def __init__(self, backend, prompts, sampling: Sampling, config: ReflectConfig):
    self.backend, self.sampling, self.config = backend, sampling, config
    self.prompts = [p for p in prompts for _ in range(sampling.n)]
    if config.rounds > 0 and backend.describe().get("kind") != "local":
      # Every round on the same raw endpoint (the first too), so a cue continues exactly the text the model saw.
      self.prompts = [render_chatml(p) if is_chat(p) else p for p in self.prompts]
    self.seeds = [sampling.seed + j for _ in prompts for j in range(sampling.n)]
    self.prefix = ["" for _ in self.prompts]
    self.finish = ["" for _ in self.prompts]
    # An OpenAI-compatible server reports no token ids; its log-probabilities give the exact count.
    self.exact_counts = (backend.describe().get("kind") == "openai_http"
                         and "logprobs" in getattr(backend, "capabilities", ()))
    self.words = backend.describe().get("kind") in ("scripted", "replay", "planted")

  def count_cue(self, cue: str) -> int:
    """Cue tokens, where countable (a scripted backend's words); -1 = unknown (a text-only server)."""
    return scripted_words(cue) if self.words else -1

  def _call(self, prompts, prefixes, sampling):
    if all(not p for p in prefixes):
      return self.backend.generate(prompts, sampling)
    if hasattr(self.backend, "continue_") and (all(isinstance(p, str) for p in prompts)
                                               or self.backend.describe().get("kind") == "local"):
      return self.backend.continue_(prompts, prefixes, sampling)
    raw = [render_chatml(p) if is_chat(p) else p for p in prompts]
    return self.backend.generate([p + x for p, x in zip(raw, prefixes)], sampling)

  def run(self, r, cues, limits, stop, answer=False):
    del r, answer
    for b, cue in enumerate(cues):
      if cue:
        self.prefix[b] += cue
    out: list[Any] = [None] * len(cues)
    groups: dict[tuple[int, int], list[int]] = {}
    for b, cue in enumerate(cues):
      if cue is not None:
        groups.setdefault((self.seeds[b], limits[b]), []).append(b)
    for (seed, limit), bs in groups.items():
      samp = dataclasses.replace(self.sampling, n=1, seed=seed, max_tokens=limit, stop=stop,
                                 logprobs=self.sampling.logprobs or self.exact_counts)
      comps = self._call([self.prompts[b] for b in bs], [self.prefix[b] for b in bs], samp)
      for b, cs in zip(bs, comps):
        c = cs[0]
        n, counted = count_tokens(self.backend, c, limit)
        text = c.text
        if c.finish_reason == "stop" and self.config.format == "module" and _unclosed_module(text):
          text += "endmodule"  # the stop string the backend cut: part of the design
        self.prefix[b] += text
        self.finish[b] = c.finish_reason
        out[b] = (text, n, counted)
    return out


class _KVRunner:
  """Rounds in one KV session of the local backend: a cue is appended into the cache (no re-prefill)."""

  def __init__(self, backend, prompts, sampling: Sampling, config: ReflectConfig, budget: int):
    self.backend, self.sampling, self.config = backend, sampling, config
    self.tok = backend.tokenizer
    cue_len = len(self.tok.encode(config.cue_text() + "\n```\nendmodule\n" + config.think_close, add_bos=False))
    extra = (config.rounds + 1) * (cue_len + 2) + (config.answer_tokens if config.format == "think" else 0)
    longest = max(len(backend.encode_prompt(p)) for p in prompts)
    # Rounded up so that runs with different budgets share one compiled cache shape.
    capacity = min(backend.context_length, -(-(longest + budget + extra + 16) // 256) * 256)
    self.session = backend.session(prompts, sampling, capacity=capacity)
    self.finish = ["" for _ in range(self.session.num_rows)]

  def count_cue(self, cue: str) -> int:
    return len(self.tok.encode(cue, add_bos=False))

  def _text(self, ids) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=True)

  def run(self, r, cues, limits, stop, answer=False):
    s = self.session
    stop_ids = set(s.stop_ids)
    if r == 0:
      comps = s.run(limits, stop)
    else:
      append = []
      for b, cue in enumerate(cues):
        if cue is None:
          append.append(None)
          continue
        tr = s.transcripts[b]
        if tr and tr[-1] in stop_ids:  # the end-of-sequence token is suppressed, as s1 suppresses end-of-think
          s.truncate(b, len(tr) - 1)
        text = self._text(s.transcripts[b])
        lead = ""
        if self.config.format == "think" and not answer:
          cut = text.rfind(self.config.think_close)  # suppress the marker: keep the tokens before it
          if cut >= 0:
            k = len(s.transcripts[b])
            while k > 0 and len(self._text(s.transcripts[b][:k])) > cut:
              k -= 1
            lead = text[len(self._text(s.transcripts[b][:k])):cut]
            s.truncate(b, k)
        append.append(self.tok.encode(lead + cue, add_bos=False) if (lead + cue) else [])
      comps = s.run([max(1, m) for m in limits], stop, append=append)
    out: list[Any] = [None] * len(cues)
    for b, c in enumerate(comps):
      if c is None:
        continue
      self.finish[b] = c.finish_reason
      text = c.text  # cut before the stop string; `endmodule` is part of the design and stays
      if (self.config.format == "module" and c.finish_reason == "stop"
          and self._text(c.tokens)[len(text):].startswith("endmodule")):
        text += "endmodule"
      out[b] = (text, len(c.tokens), "exact")
    return out


def simulator_cue(problems: Sequence[Any], n: int, simulator: str = "iverilog") -> CueFn:
  """The EXTENSION's cue (not ScaleRTL): the simulator's verdict on the round's design; None once it passes."""
  from lacax.hw.bench import harness  # pylint: disable=g-import-not-at-top
  from lacax.hw.bench.problem import assemble  # pylint: disable=g-import-not-at-top

  def cue(b: int, r: int, trace: Trace) -> str | None:
    del r
    prob = problems[b // n]
    res = harness.simulate_design(prob, assemble(prob, trace.code_after(None, prob.top)), simulator)
    if res.category == "pass":
      return None
    detail = (res.detail or "").strip().replace("\n", " ")[:400]
    return (f"\n\nThe simulator rejects this design ({res.category}: {detail}). Here is the design again, fixed:"
            "\n```verilog\n")

  return cue
