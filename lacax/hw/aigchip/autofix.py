"""GPT4AIGChip's error parser / auto-fixer (§IV: undefined variables, pragma misuse, out-of-bounds), for Verilog.

Model-written module code goes through `extract` (the code out of a chat answer: fenced blocks, prose around
`module ... endmodule`), then `fix_loop`: compile with iverilog in the sandbox, parse the messages
(`parse_errors`) and apply the fix each recognised message has, until it compiles or no rule applies. The rules
(each named in the record of fixes):

  extract            prose / markdown fences around the code              -> the module text only
  missing_endmodule  `module` without `endmodule` ("syntax error" at EOF)  -> append `endmodule`
  module_name        the module is not called what the template expects  -> rename it
                     ("Unknown module type: gemm_pe")
  wire_to_reg        a net assigned in an always block                   -> declare it `reg` (also `output reg`)
                     ("... is not a valid l-value", "... declared here as wire")
  undeclared         an identifier used but never declared               -> declare it (reg if assigned in an
                     ("Unable to bind wire/reg/memory `x'")                  always block, else wire), width 32
  sv_keywords        `always_ff` / `always_comb` / `logic` without -g2012 -> their Verilog-2005 forms (only when
                                                                           the compiler rejects them)
  yosys_implicit     yosys "Identifier `\\x' is implicitly declared"      -> as `undeclared`

Nothing here runs the code; `fix_loop` compiles through `lacax.hw.tools.iverilog` (the sandbox).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

from lacax.hw.tools import iverilog

_FENCE_RE = re.compile(r"```[a-zA-Z]*\n(.*?)(?:```|\Z)", re.DOTALL)
_MODULE_RE = re.compile(r"\bmodule\s+([A-Za-z_][\w$]*)")
_UNBOUND_RE = re.compile(r"Unable to bind (?:wire/reg/memory|parameter) `([A-Za-z_][\w$]*)'")
_NOT_DECLARED_RE = re.compile(r"'?`?([A-Za-z_][\w$]*)'? (?:is not declared|was not declared)|"
                              r"Identifier `\\?([A-Za-z_][\w$]*)' is implicitly declared")
_LVALUE_RE = re.compile(r"([A-Za-z_][\w$.]*) is not a valid l-value")
_UNKNOWN_MODULE_RE = re.compile(r"Unknown module type: ([A-Za-z_][\w$]*)")


@dataclasses.dataclass(frozen=True)
class Fix:
  rule: str
  detail: str


def extract(text: str) -> tuple[str, list[Fix]]:
  """The Verilog in a model's answer: the fenced block holding `module` (else the text from the first `module`
  to the last `endmodule`)."""
  fixes = []
  blocks = [b for b in _FENCE_RE.findall(text) if "module" in b]
  if blocks:
    code = max(blocks, key=len)
    fixes.append(Fix("extract", "code taken from a fenced block"))
  else:
    code = text
  m = re.search(r"\bmodule\b", code)
  start = m.start() if m else -1
  if start > 0 and code[:start].strip():
    head = code[:start]
    lines = [l for l in head.splitlines() if l.strip()]
    keep = [l for l in lines if l.strip().startswith(("//", "`"))]
    if len(keep) < len(lines):  # keep a leading comment / `timescale line; drop prose
      code = "\n".join(keep + [code[start:]])
      fixes.append(Fix("extract", "prose before the module dropped"))
  end = code.rfind("endmodule")
  if end >= 0 and code[end + len("endmodule"):].strip():
    code = code[:end + len("endmodule")] + "\n"
    fixes.append(Fix("extract", "text after endmodule dropped"))
  return code.strip() + "\n", fixes


def _header_end(code: str) -> int:
  """Index just after the module header's `);`."""
  m = re.search(r"\bmodule\b.*?\)\s*;", code, re.DOTALL)
  return m.end() if m else -1


def _declare(code: str, name: str) -> str | None:
  if re.search(rf"\b(wire|reg|logic|integer|input|output|inout)\b[^;]*\b{re.escape(name)}\b", code):
    return None
  at = _header_end(code)
  if at < 0:
    return None
  assigned_in_always = re.search(rf"\b{re.escape(name)}\s*(<=|=[^=])", code) and re.search(r"\balways", code) \
      and not re.search(rf"\bassign\s+{re.escape(name)}\b", code)
  kind = "reg" if assigned_in_always else "wire"
  return code[:at] + f"\n  {kind} [31:0] {name};  // lacax autofix: undeclared" + code[at:]


def _to_reg(code: str, name: str) -> str | None:
  name = name.split(".")[-1]
  pat = re.compile(rf"\b(output|wire)(\s+wire)?(\s*\[[^\]]*\])?(\s+)([^;,()]*?\b{re.escape(name)}\b)")
  m = pat.search(code)
  if not m:
    return None
  kind = "output reg" if m.group(1) == "output" else "reg"
  return code[:m.start()] + kind + (m.group(3) or "") + m.group(4) + m.group(5) + code[m.end():]


def parse_errors(messages: str) -> list[tuple[str, str]]:
  """[(rule, subject)] for the messages the fixer knows, in order, without repeats."""
  out: list[tuple[str, str]] = []
  for m in _UNKNOWN_MODULE_RE.finditer(messages):
    out.append(("module_name", m.group(1)))
  for m in _UNBOUND_RE.finditer(messages):
    out.append(("undeclared", m.group(1)))
  for m in _NOT_DECLARED_RE.finditer(messages):
    out.append(("yosys_implicit" if m.group(2) else "undeclared", m.group(1) or m.group(2)))
  for m in _LVALUE_RE.finditer(messages):
    out.append(("wire_to_reg", m.group(1)))
  if re.search(r"syntax error", messages) and re.search(r"I give up|Syntax in assignment|end of input|"
                                                        r"endmodule", messages):
    out.append(("missing_endmodule", ""))
  if re.search(r"always_ff|always_comb|\blogic\b", messages):
    out.append(("sv_keywords", ""))
  seen, uniq = set(), []
  for item in out:
    if item not in seen:
      seen.add(item)
      uniq.append(item)
  return uniq


def apply(code: str, rule: str, subject: str, expected_module: str | None = None) -> str | None:
  """The code with one fix applied, or None when the rule does not apply to this code."""
  if rule == "module_name":
    names = _MODULE_RE.findall(code)
    if expected_module and subject == expected_module and len(names) == 1 and names[0] != expected_module:
      return _MODULE_RE.sub(f"module {expected_module}", code, count=1)
    return None
  if rule in ("undeclared", "yosys_implicit"):
    return _declare(code, subject)
  if rule == "wire_to_reg":
    return _to_reg(code, subject)
  if rule == "missing_endmodule":
    if code.count("endmodule") < len(re.findall(r"\bmodule\b", code)):
      return code.rstrip() + "\nendmodule\n"
    return None
  if rule == "sv_keywords":
    new = re.sub(r"\balways_ff\b", "always", code)
    new = re.sub(r"\balways_comb\b", "always @(*)", new)
    new = re.sub(r"\blogic\b", "reg", new)
    return new if new != code else None
  raise ValueError(f"rule={rule!r} is not an autofix rule")


def fix_loop(code: str, module: str, context: Mapping[str, str], *, rounds: int = 4,
             compile_fn: Callable[[Mapping[str, str]], tuple[bool, str]] | None = None
             ) -> tuple[str, list[Fix], bool, str]:
  """Extracts and repairs model-written `module` until `context` + it compiles.

  Args:
    code: the model's answer (prose and fences allowed).
    module: the module name the template expects (e.g. "gemm_pe").
    context: the other sources ({file: text}, testbench included) it is compiled with.
    rounds: compile / fix rounds at most.
    compile_fn: (sources) -> (ok, messages); default iverilog in the sandbox.

  Returns:
    (code, fixes applied, compiles, the last compiler messages).
  """
  compile_fn = compile_fn or _iverilog_compile
  code, fixes = extract(code)
  if not _MODULE_RE.search(code):
    return code, fixes, False, "no module in the answer"
  if code.count("endmodule") < len(re.findall(r"\bmodule\b", code)):
    code = code.rstrip() + "\nendmodule\n"
    fixes.append(Fix("missing_endmodule", "appended"))
  names = _MODULE_RE.findall(code)
  if len(names) == 1 and names[0] != module:
    code = _MODULE_RE.sub(f"module {module}", code, count=1)
    fixes.append(Fix("module_name", f"{names[0]} -> {module}"))
  messages = ""
  for _ in range(rounds):
    ok, messages = compile_fn({**context, f"{module}.v": code})
    if ok:
      return code, fixes, True, messages
    applied = False
    for rule, subject in parse_errors(messages):
      new = apply(code, rule, subject, module)
      if new is not None and new != code:
        code = new
        fixes.append(Fix(rule, subject))
        applied = True
    if not applied:
      break
  ok, messages = compile_fn({**context, f"{module}.v": code})
  return code, fixes, ok, messages


def _iverilog_compile(sources: Mapping[str, str]) -> tuple[bool, str]:
  ok, res = iverilog.compiles(dict(sources), top="tb")
  return ok, res.stderr + "\n" + res.stdout


def fixes_json(fixes: Sequence[Fix]) -> list[dict[str, str]]:
  return [dataclasses.asdict(f) for f in fixes]
