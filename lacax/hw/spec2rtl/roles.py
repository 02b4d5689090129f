"""The role prompts of Spec2RTL-Agent and the parsing of their answers.

Every prompt is a chat: a system message that gives the role, and a user message whose first line is a tag

    [spec2rtl] role=<role> spec=<spec name> subfunction=<name or -> stage=<stage or -> attempt=<n>

(it tells a person reading a transcript, and the reference-replaying backend, what is being asked), then the
material. Roles (arXiv 2506.13905, as re-implemented by CirbuildProject/Cirbuild-Spec2RTL; see
../shared/research/hardware_llm.md §2.2):

  Module 1  summarizer, decomposer (ordered sub-functions with info dicts), describer, verifier
  Module 2  pseudocode_coder, python_coder, cpp_coder, hls_coder (DSLX), prompt_optimizer
  Module 3  error_analyzer (chooses one of the four reflection paths)
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

ROLES = ("summarizer", "decomposer", "describer", "verifier", "pseudocode_coder", "python_coder", "cpp_coder",
         "hls_coder", "prompt_optimizer", "error_analyzer")
STAGES = ("pseudocode", "python", "cpp", "hls")
CODER = {"pseudocode": "pseudocode_coder", "python": "python_coder", "cpp": "cpp_coder", "hls": "hls_coder"}
FENCE = {"pseudocode": "text", "python": "python", "cpp": "cpp", "hls": "dslx"}
TAG_RE = re.compile(r"^\[spec2rtl\] role=(\S+) spec=(\S+) subfunction=(\S+) stage=(\S+) attempt=(\d+)", re.M)
INSTRUCTIONS_BEGIN, INSTRUCTIONS_END = "<<<INSTRUCTIONS", "INSTRUCTIONS>>>"

SYSTEM = {
    "summarizer": "You are the Summarization agent of a specification-to-RTL team. You read hardware "
                  "specification documents and state precisely what the design must compute.",
    "decomposer": "You are the Decomposer of a specification-to-RTL team. You split a design into an ordered list "
                  "of small sub-functions, each with its interface and a step-by-step plan.",
    "describer": "You are the Description agent of a specification-to-RTL team. You explain each sub-function "
                 "of a plan in precise prose for the programmers.",
    "verifier": "You are the plan Verifier of a specification-to-RTL team. You check a plan against the "
                "specification and answer PASS or FAIL with reasons.",
    "pseudocode_coder": "You are a hardware algorithm designer. You write clear pseudocode.",
    "python_coder": "You are an expert Python programmer writing bit-exact golden models of hardware.",
    "cpp_coder": "You are an expert C++ programmer writing synthesizable, HLS-friendly C++.",
    "hls_coder": "You are an expert in DSLX, the dataflow language of the Google XLS high-level synthesis tool.",
    "prompt_optimizer": "You improve the instructions given to a code-writing agent so that it stops making the "
                        "mistake it made.",
    "error_analyzer": "You are the error analyser of a specification-to-RTL team. You trace a failure to where it "
                      "came from and choose how to recover.",
}

DEFAULT_INSTRUCTIONS = {
    "pseudocode": "Write language-neutral pseudocode for the function, one step per line, using exactly the "
                  "function name and argument names of the interface. Fixed-width unsigned arithmetic; say "
                  "where values wrap. No code fences are needed.",
    "python": "Write one Python function with exactly the given name and arguments. Arguments and the result are "
              "non-negative ints; keep the result within the output width (mask it). Use only plain Python, no "
              "imports, no input or output. The earlier sub-functions listed are already defined: call them, do "
              "not redefine them. Answer with one ```python code block.",
    "cpp": "Write one C++17 function with exactly the given signature (the fixed-width types of <cstdint>). No "
           "main, no input or output, no dynamic memory, no recursion, loops with constant bounds (this is the "
           "form that goes to high-level synthesis). The earlier sub-functions listed are already defined: call "
           "them, do not redefine them. Answer with one ```cpp code block.",
    "hls": "Write the function in DSLX, the XLS language: `fn name(a: u8, b: u8) -> u8 { ... }`, and `pub fn` for "
           "the top function. Types are uN; literals are typed (u8:1); the last expression is the result; "
           "`let` binds; `if c { x } else { y }` is an expression; loops are `for (i, acc): (u32, T) in "
           "u32:0..u32:N { body }(init)`; bits are sliced with x[lo:hi]; `as` casts; `++` concatenates; "
           "uN / sN (u1, s1, ...) are type keywords, not names. The earlier sub-functions listed are already "
           "defined: call them, do not redefine them. Answer with one ```dslx code block.",
}


def tag(role: str, spec: str, subfunction: str | None = None, stage: str | None = None, attempt: int = 0) -> str:
  return f"[spec2rtl] role={role} spec={spec} subfunction={subfunction or '-'} stage={stage or '-'} attempt={attempt}"


def parse_tag(prompt: Any) -> dict[str, Any] | None:
  """{"role", "spec", "subfunction", "stage", "attempt"} from a prompt (chat or text), or None."""
  text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
  m = TAG_RE.search(text)
  if not m:
    return None
  role, spec, sub, stage, attempt = m.groups()
  return {"role": role, "spec": spec, "subfunction": None if sub == "-" else sub,
          "stage": None if stage == "-" else stage, "attempt": int(attempt)}


def chat(role: str, header: str, body: str) -> list[dict[str, str]]:
  return [{"role": "system", "content": SYSTEM[role]}, {"role": "user", "content": header + "\n\n" + body}]


def signature(sub: Mapping[str, Any], stage: str, top: bool) -> str:
  """The function's interface written for a stage's language."""
  from lacax.hw.spec2rtl.execute import c_type  # pylint: disable=g-import-not-at-top
  ins, out = sub["inputs"], sub["output"]
  if stage == "python":
    return f"def {sub['name']}({', '.join(p['name'] for p in ins)}):  # returns u{out['width']}"
  if stage == "cpp":
    args = ", ".join(f"{c_type(p['width'])} {p['name']}" for p in ins)
    return f"{c_type(out['width'])} {sub['name']}({args})"
  if stage == "hls":
    args = ", ".join(f"{p['name']}: u{p['width']}" for p in ins)
    return f"{'pub ' if top else ''}fn {sub['name']}({args}) -> u{out['width']}"
  args = ", ".join(f"{p['name']}: {p['width']} bits" for p in ins)
  return f"function {sub['name']}({args}) -> {out['width']} bits"


def extract_code(text: str, stage: str) -> str:
  """The first fenced block (preferring one labelled for the stage's language), else the text itself."""
  blocks = re.findall(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", text, re.S)
  if not blocks:
    opened = re.search(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*)$", text, re.S)  # an unclosed fence (cut by max_tokens)
    return (opened.group(1) if opened else text).strip() + "\n"
  wanted = {"python": ("python", "py"), "cpp": ("cpp", "c++", "c", "cc"), "hls": ("dslx", "x", "rust", "xls"),
            "pseudocode": ("text", "pseudo", "pseudocode", "")}[stage]
  for lang, body in blocks:
    if lang.lower() in wanted:
      return body.strip() + "\n"
  return blocks[0][1].strip() + "\n"


def extract_json(text: str, kind: type) -> Any:
  """The first JSON value of type `kind` (list or dict) in the text (fenced or bare), or None."""
  opener = "[" if kind is list else "{"
  candidates = [b for _, b in re.findall(r"```([A-Za-z]*)[ \t]*\n(.*?)```", text, re.S)] + [text]
  decoder = json.JSONDecoder()
  for cand in candidates:
    for i, ch in enumerate(cand):
      if ch != opener:
        continue
      try:
        value, _ = decoder.raw_decode(cand[i:])
      except json.JSONDecodeError:
        continue
      if isinstance(value, kind):
        return value
  return None


def instructions_block(text: str) -> str:
  return f"{INSTRUCTIONS_BEGIN}\n{text}\n{INSTRUCTIONS_END}"


def read_instructions(prompt: Any) -> str:
  """The instructions block of a prompt-optimiser prompt."""
  text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
  m = re.search(re.escape(INSTRUCTIONS_BEGIN) + r"\n(.*?)\n" + re.escape(INSTRUCTIONS_END), text, re.S)
  return m.group(1) if m else ""


def format_plan(plan: Sequence[Mapping[str, Any]]) -> str:
  return json.dumps(list(plan), indent=1)
