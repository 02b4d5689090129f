"""General RTL rules and the reflection cues built from them.

ScaleRTL (arXiv 2506.05566) builds its corrective prompt from general RTL coding guidelines and keeps it
tool-free. The rule list here is VerilogEval v2's own (NVlabs/verilog-eval `scripts/sv-generate`,
`prompt_rules_suffix`, MIT licence), reworded only as far as joining its lines; a few rules that name the bug
classes of `lacax.hw.scale_rtl.traces` (non-blocking assignment in clocked blocks, widths, case defaults) follow
it as `EXTRA_RULES`. The paper's exact cue string is not public; `cue()` is lacax's.
"""

from __future__ import annotations

from typing import Sequence

# VerilogEval v2, scripts/sv-generate (prompt_rules_suffix).
VERILOG_EVAL_RULES = (
    "Declare all ports and signals as logic; do not use wire or reg.",
    "For combinational logic with an always block do not explicitly specify the sensitivity list; instead use "
    "always @(*).",
    "All sized numeric constants must have a size greater than zero (e.g, 0'b0 is not a valid expression).",
    "An always block must read at least one signal otherwise it will never be executed; use an assign statement "
    "instead of an always block in situations where there is no need to read any signals.",
    "If the module uses a synchronous reset signal, this means the reset signal is sampled with respect to the "
    "clock. When implementing a synchronous reset signal, do not include posedge reset in the sensitivity list "
    "of any sequential always block.",
)
EXTRA_RULES = (
    "Check the reset polarity: an active-high reset acts when reset is 1.",
    "Use non-blocking assignments (<=) in clocked always blocks and blocking assignments in combinational ones.",
    "Check every vector width against the specification.",
    "Give every case statement a default branch.",
)
RULE_SETS = {"verilog_eval": VERILOG_EVAL_RULES, "verilog_eval+extra": VERILOG_EVAL_RULES + EXTRA_RULES}


def rules(name: str = "verilog_eval+extra") -> tuple[str, ...]:
  if name not in RULE_SETS:
    raise ValueError(f"rules={name!r} must be one of {sorted(RULE_SETS)}")
  return RULE_SETS[name]


def cue(rule_list: Sequence[str], fmt: str = "module") -> str:
  """The budget-forcing cue (s1's "Wait", with the rules to check against).

  fmt "module" (no-think answers: the cue follows an `endmodule`, and asks for the whole design again, in a
  fence, so that the last complete design is the answer) or "think" (the cue replaces the end-of-think marker
  and reasoning goes on).
  """
  listed = "\n".join(f"- {r}" for r in rule_list)
  if fmt == "think":
    return f"\nWait, let me check the design against these rules:\n{listed}\n"
  if fmt != "module":
    raise ValueError(f"cue format={fmt!r} must be 'module' or 'think'")
  return (f"\n\nWait, let me check the design against the specification and these rules:\n{listed}\n"
          "Here is the design again, corrected where it breaks the specification or a rule:\n```verilog\n")


def close_fence(text: str) -> str:
  """What closes an open ``` fence at the end of `text` ("" when none is open)."""
  return "\n```" if text.count("```") % 2 else ""
