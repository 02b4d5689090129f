"""Synthetic hardware tasks with true multi-grained labels: MG-Verilog's four description levels, offline.

MG-Verilog (arXiv 2407.01910) labels real code with LLM-written descriptions at four granularities (line
comments -> block summaries -> detailed global summary -> high-level summary). Here the labels come from the
templates' semantics instead, so they are correct by construction and deterministic: every task is a
parameterised template instance (`TEMPLATES`, grouped into `FAMILIES`) that builds

  - the reference design, as blocks of lines, each line with its comment and each block with its summary;
  - the four descriptions: "high_level" (one sentence for a non-expert), "detailed" (ports with widths,
    behaviour, truth tables / transition tables, reset and timing), "block" (`block_i: <summary>` per block, as
    MG-Verilog prints them), "line" (one comment per code line, in order);
  - a VerilogEval-style mismatch testbench (RefModule vs TopModule, seeded random stimulus on the falling clock
    edge, outputs compared with `===`, "Mismatches: N in M samples");
  - a mutant: the same template with one semantic change (an operator, a transition, a reset value), which the
    testbench must catch.

Families: logic (bitwise, reduce, mux), arith (adder, subtractor, comparator), coding (decoder,
priority_encoder, popcount, gray), sequential (counter, shift_register, edge_detector, accumulator), fsm
(fsm_table: a random Moore machine from a transition table; sequence_detector). `split` holds out template
parameters, whole templates, or whole families.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Mapping, Sequence

from lacax.hw.bench.problem import Problem

LEVELS = ("high_level", "detailed", "block", "line")


@dataclasses.dataclass(frozen=True)
class Port:
  name: str
  direction: str  # "input" | "output"
  width: int
  doc: str
  reg: bool = False  # declared `output reg`

  def decl(self) -> str:
    rng = f" [{self.width - 1}:0]" if self.width > 1 else ""
    return f"{self.direction}{' reg' if self.reg else ''}{rng} {self.name}"

  def describe(self) -> str:
    return f"- {self.direction} {self.name} ({self.width} bit{'s' if self.width > 1 else ''}): {self.doc}"


@dataclasses.dataclass(frozen=True)
class Block:
  summary: str
  lines: tuple[tuple[str, str], ...]  # (code, comment)


@dataclasses.dataclass(frozen=True)
class Design:
  ports: tuple[Port, ...]
  blocks: tuple[Block, ...]
  high_level: str
  behaviour: str
  clocked: bool = False


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  family: str
  sample: Callable[[random.Random], dict[str, Any]]
  build: Callable[[Mapping[str, Any], bool], Design]  # (params, mutate) -> Design


def header(ports: Sequence[Port], name: str = "TopModule") -> str:
  return f"module {name} (\n" + ",\n".join(f"  {p.decl()}" for p in ports) + "\n);"


def render_code(design: Design, name: str = "TopModule", comments: bool = False) -> str:
  lines = [header(design.ports, name)]
  for block in design.blocks:
    for code, comment in block.lines:
      lines.append(f"  {code}" + (f"  // {comment}" if comments and comment else ""))
  lines.append("endmodule")
  return "\n".join(lines) + "\n"


def _w(width: int) -> str:
  return f"[{width - 1}:0] " if width > 1 else ""


def _bits(w: int) -> str:
  return f"{w}-bit" if w > 1 else "1-bit"


# ---------------------------------------------------------------------------------------------------- logic
_BITWISE = {"and": ("&", "AND"), "or": ("|", "OR"), "xor": ("^", "XOR"), "nand": ("&", "NAND"),
            "nor": ("|", "NOR"), "xnor": ("^", "XNOR")}
_BITWISE_MUT = {"and": "or", "or": "and", "xor": "and", "nand": "nor", "nor": "nand", "xnor": "xor"}


def _bitwise(p, mutate):
  op = _BITWISE_MUT[p["op"]] if mutate else p["op"]
  sym, word = _BITWISE[op]
  w = p["width"]
  neg = op in ("nand", "nor", "xnor")
  expr = f"~(a {sym} b)" if neg else f"a {sym} b"
  _, shown = _BITWISE[p["op"]]
  return Design(
      (Port("a", "input", w, "first operand"), Port("b", "input", w, "second operand"),
       Port("y", "output", w, f"bitwise {shown} of a and b")),
      (Block(f"Computes the bitwise {shown} of the two {_bits(w)} inputs a and b and drives it onto y.",
             ((f"assign y = {expr};", f"y gets the bitwise {shown} of a and b"),)),),
      f"A circuit that combines two {_bits(w)} values bit by bit with a logical {shown}.",
      f"Each bit y[i] is the {shown} of a[i] and b[i]"
      + (" (the inverted result of the corresponding basic gate)" if neg else "") + ". The module is purely "
      "combinational.")


_REDUCE = {"and": ("&", "AND", "1 when every bit of x is 1"), "or": ("|", "OR", "1 when any bit of x is 1"),
           "xor": ("^", "XOR", "1 when x has an odd number of 1 bits (odd parity)")}


def _reduce(p, mutate):
  op = {"and": "or", "or": "xor", "xor": "or"}[p["op"]] if mutate else p["op"]
  w = p["width"]
  _, word, meaning = _REDUCE[p["op"]]
  return Design(
      (Port("x", "input", w, "the input vector"), Port("y", "output", 1, f"the {word} of all bits of x")),
      (Block(f"Reduces the {w} bits of x to one bit with {word} and drives y.",
             ((f"assign y = {_REDUCE[op][0]}x;", f"y is the {word} reduction of x"),)),),
      f"A circuit that tells whether the bits of a {w}-bit value satisfy a {word} test.",
      f"y is the {word} of all {w} bits of x: {meaning}. Combinational.")


def _mux(p, mutate):
  n, w = p["inputs"], p["width"]
  sw = 1 if n == 2 else 2
  ins = [f"d{i}" for i in range(n)]
  order = list(range(n))
  if mutate:
    order[0], order[1] = order[1], order[0]
  lines = [("always @(*) begin", "combinational selection"),
           ("  case (sel)", "choose by the select input")]
  for i in range(n):
    lines.append((f"    {sw}'d{i}: y = {ins[order[i]]};", f"select value {i} passes d{i} to y"))
  lines += [("    default: y = " + ins[0] + ";", "any other select value passes d0"),
            ("  endcase", "end of the selection"), ("end", "end of the combinational block")]
  return Design(
      tuple(Port(x, "input", w, f"data input {i}") for i, x in enumerate(ins))
      + (Port("sel", "input", sw, "the select input"), Port("y", "output", w, "the selected data input", reg=True)),
      (Block(f"A combinational case statement on sel that copies the selected data input d<sel> to y "
             f"({n} choices).", tuple(lines)),),
      f"A {n}-to-1 multiplexer that picks one of {n} {_bits(w)} inputs.",
      f"y equals d<sel>: " + ", ".join(f"sel = {i} selects d{i}" for i in range(n)) + ". Combinational.")


# ---------------------------------------------------------------------------------------------------- arith
def _adder(p, mutate):
  w = p["width"]
  expr = "a + b + 1" if mutate else "a + b"
  return Design(
      (Port("a", "input", w, "first addend"), Port("b", "input", w, "second addend"),
       Port("sum", "output", w, "the low bits of a + b"), Port("cout", "output", 1, "the carry out of a + b")),
      (Block(f"Adds a and b as unsigned {w}-bit numbers; the {w + 1}-bit result is split into the carry cout "
             "and the sum.", ((f"assign {{cout, sum}} = {expr};", f"cout and sum take the {w + 1}-bit sum of a and b"),)),),
      f"A circuit that adds two {w}-bit numbers and reports the carry.",
      f"{{cout, sum}} = a + b as unsigned numbers: sum holds the low {w} bits and cout is 1 when the sum is at "
      f"least 2^{w}. Combinational.")


def _subtractor(p, mutate):
  w = p["width"]
  expr = "b - a" if mutate else "a - b"
  return Design(
      (Port("a", "input", w, "minuend"), Port("b", "input", w, "subtrahend"),
       Port("diff", "output", w, "a - b modulo 2^width"), Port("borrow", "output", 1, "1 when b > a")),
      (Block(f"Subtracts b from a in {w} bits (wrapping) and flags a borrow when b is larger.",
             ((f"assign diff = {expr};", "diff is a minus b, wrapping around"),
              ("assign borrow = b > a;", "borrow is set when b exceeds a"))),),
      f"A circuit that subtracts one {w}-bit number from another.",
      f"diff = a - b modulo 2^{w}; borrow = 1 exactly when b > a (unsigned). Combinational.")


def _comparator(p, mutate):
  w = p["width"]
  lt = "a <= b" if mutate else "a < b"
  sign = "signed" if p["signed"] else "unsigned"
  cast = (lambda e: e.replace("a", "$signed(a)").replace("b", "$signed(b)")) if p["signed"] else (lambda e: e)
  return Design(
      (Port("a", "input", w, f"first {sign} operand"), Port("b", "input", w, f"second {sign} operand"),
       Port("eq", "output", 1, "1 when a equals b"), Port("lt", "output", 1, "1 when a is less than b"),
       Port("gt", "output", 1, "1 when a is greater than b")),
      (Block(f"Compares a and b as {sign} {w}-bit numbers and sets exactly one of eq, lt, gt.",
             (("assign eq = a == b;", "eq: the operands are equal"),
              (f"assign lt = {cast(lt)};", f"lt: a is smaller ({sign})"),
              (f"assign gt = {cast('a > b')};", f"gt: a is larger ({sign})"))),),
      f"A circuit that tells whether one {w}-bit number is equal to, smaller or larger than another.",
      f"Treating a and b as {sign} {w}-bit numbers: eq = (a == b), lt = (a < b), gt = (a > b). Combinational.")


# --------------------------------------------------------------------------------------------------- coding
def _decoder(p, mutate):
  n = p["bits"]
  m = 1 << n
  shift = "(sel + 1'b1)" if mutate else "sel"
  return Design(
      (Port("sel", "input", n, "the binary index"), Port("en", "input", 1, "enable"),
       Port("y", "output", m, "one-hot output")),
      (Block(f"Drives a one-hot {m}-bit output: bit sel is 1 when enabled, all bits 0 otherwise.",
             ((f"assign y = en ? ({m}'d1 << {shift}) : {m}'d0;", "shift a single 1 to position sel when enabled"),)),),
      f"A {n}-to-{m} decoder that turns a binary number into a one-hot signal.",
      f"When en = 1, y has exactly bit y[sel] set; when en = 0, y is all zeros. Combinational.")


def _priority_encoder(p, mutate):
  w = p["width"]
  iw = max(1, (w - 1).bit_length())
  order = range(w) if not mutate else range(w - 1, -1, -1)  # the mutant favours the lowest set bit
  lines = [("always @(*) begin", "combinational priority search"),
           (f"  idx = {iw}'d0;", "default index when no bit is set"),
           ("  valid = 1'b0;", "default: no bit set")]
  for i in order:
    lines.append((f"  if (x[{i}]) begin idx = {iw}'d{i}; valid = 1'b1; end",
                  f"bit {i} overrides the lower bits"))
  lines.append(("end", "end of the priority search"))
  return Design(
      (Port("x", "input", w, "request bits"), Port("idx", "output", iw, "index of the highest set bit", reg=True),
       Port("valid", "output", 1, "1 when any bit of x is set", reg=True)),
      (Block(f"Scans the {w} request bits from lowest to highest so the highest set bit wins; reports its index "
             "and whether any bit was set.", tuple(lines)),),
      f"A priority encoder that finds the most significant set bit among {w} requests.",
      f"idx is the position of the highest 1 bit of x and valid = 1; when x = 0, idx = 0 and valid = 0. "
      "Combinational.")


def _popcount(p, mutate):
  w = p["width"]
  ow = w.bit_length()
  lines = [("integer i;", "loop index"), ("always @(*) begin", "combinational count"),
           (f"  count = {ow}'d0;", "start from zero"),
           (f"  for (i = 0; i < {w}; i = i + 1)", "visit every input bit"),
           (f"    count = count + {'!' if mutate else ''}x[i];", "add one for each 1 bit"),
           ("end", "end of the count")]
  return Design(
      (Port("x", "input", w, "the input vector"), Port("count", "output", ow, "the number of 1 bits in x", reg=True)),
      (Block(f"Counts the 1 bits of x in a combinational loop over all {w} bits.", tuple(lines)),),
      f"A circuit that counts how many bits of a {w}-bit value are 1.",
      f"count is the number of bits of x equal to 1 (0 to {w}). Combinational.")


def _gray(p, mutate):
  w = p["width"]
  if p["direction"] == "bin2gray":
    expr = "b ^ (b >> 2)" if mutate else "b ^ (b >> 1)"
    return Design(
        (Port("b", "input", w, "binary value"), Port("g", "output", w, "the Gray code of b")),
        (Block("Converts binary to Gray code: each bit is the XOR of a bit and the next higher bit.",
               ((f"assign g = {expr};", "XOR b with itself shifted right by one"),)),),
        f"A converter from {w}-bit binary numbers to Gray code.",
        f"g = b XOR (b >> 1): g[{w - 1}] = b[{w - 1}] and g[i] = b[i+1] XOR b[i]. Combinational.")
  lines = [(f"assign b[{w - 1}] = g[{w - 1}];", "the top bit is copied")]
  for i in range(w - 2, -1, -1):
    src = f"g[{i}]" if mutate and i == 0 else f"b[{i + 1}] ^ g[{i}]"
    lines.append((f"assign b[{i}] = {src};", f"bit {i} is the XOR of the bit above and g[{i}]"))
  return Design(
      (Port("g", "input", w, "Gray-coded value"), Port("b", "output", w, "the binary value of g")),
      (Block("Converts Gray code to binary from the top bit down: each binary bit is the XOR of the binary bit "
             "above it and the Gray bit.", tuple(lines)),),
      f"A converter from {w}-bit Gray code back to binary.",
      f"b[{w - 1}] = g[{w - 1}] and b[i] = b[i+1] XOR g[i] for lower bits. Combinational.")


# ----------------------------------------------------------------------------------------------- sequential
_CLK = Port("clk", "input", 1, "clock (rising edge)")
_RST = Port("reset", "input", 1, "synchronous active-high reset")


def _counter(p, mutate):
  w, up, init = p["width"], p["up"], p["reset_value"]
  init_m = (init + 1) % (1 << w) if mutate else init
  op = "+" if up else "-"
  return Design(
      (_CLK, _RST, Port("en", "input", 1, "count enable"), Port("q", "output", w, "the counter value", reg=True)),
      (Block(f"On every rising clock edge: reset loads {init}, otherwise the counter {'increments' if up else 'decrements'} "
             "when enabled (wrapping).",
             (("always @(posedge clk) begin", "state changes on the rising clock edge"),
              (f"  if (reset) q <= {w}'d{init_m};", f"synchronous reset loads {init}"),
              (f"  else if (en) q <= q {op} {w}'d1;", f"count {'up' if up else 'down'} by one when enabled"),
              ("end", "end of the clocked block"))),),
      f"A {w}-bit {'up' if up else 'down'} counter with enable and reset.",
      f"Synchronous to the rising edge of clk: if reset is 1, q becomes {init}; else if en is 1, q becomes "
      f"q {op} 1 modulo 2^{w}; else q holds.", clocked=True)


def _shift_register(p, mutate):
  w, left = p["width"], p["left"]
  go_left = left != mutate
  nxt = f"{{q[{w - 2}:0], din}}" if go_left else f"{{din, q[{w - 1}:1]}}"
  return Design(
      (_CLK, _RST, Port("din", "input", 1, "serial input bit"), Port("q", "output", w, "the register contents", reg=True)),
      (Block(f"On every rising clock edge: reset clears the register, otherwise it shifts {'left' if left else 'right'} "
             f"by one with din entering at the {'low' if left else 'high'} end.",
             (("always @(posedge clk) begin", "state changes on the rising clock edge"),
              (f"  if (reset) q <= {w}'d0;", "synchronous reset clears the register"),
              (f"  else q <= {nxt};", f"shift {'left' if left else 'right'}, din enters"),
              ("end", "end of the clocked block"))),),
      f"A {w}-bit serial-in shift register.",
      f"Synchronous to the rising edge of clk: reset = 1 clears q; otherwise q shifts {'left' if left else 'right'} "
      f"by one position and din becomes q[{0 if left else w - 1}].", clocked=True)


def _edge_detector(p, mutate):
  kind = p["kind"]
  exprs = {"rising": "d & ~prev", "falling": "~d & prev", "any": "d ^ prev"}
  expr = exprs[{"rising": "falling", "falling": "rising", "any": "rising"}[kind]] if mutate else exprs[kind]
  word = {"rising": "0-to-1", "falling": "1-to-0", "any": "any"}[kind]
  return Design(
      (_CLK, _RST, Port("d", "input", 1, "the monitored signal"),
       Port("pulse", "output", 1, f"1 for one cycle after a {word} change of d", reg=True)),
      (Block("Remembers the previous value of d in a register.",
             (("reg prev;", "d as sampled at the previous clock edge"),)),
       Block(f"On every rising clock edge: reset clears both registers; otherwise pulse reports a {word} "
             "transition between the previous and current sample, and the current sample is remembered.",
             (("always @(posedge clk) begin", "state changes on the rising clock edge"),
              ("  if (reset) begin prev <= 1'b0; pulse <= 1'b0; end", "synchronous reset clears the state"),
              (f"  else begin pulse <= {expr}; prev <= d; end", f"detect a {word} edge, remember d"),
              ("end", "end of the clocked block")))),
      f"An edge detector that pulses when a signal makes a {word} transition.",
      f"At each rising clock edge (when reset = 0), pulse becomes 1 if d made a {word} change since the previous "
      "edge, else 0, and the sample of d is stored. reset = 1 clears pulse and the stored sample.", clocked=True)


def _accumulator(p, mutate):
  w = p["width"]
  cond = "1'b1" if mutate else "en"
  return Design(
      (_CLK, _RST, Port("en", "input", 1, "add enable"), Port("x", "input", w, "value to add"),
       Port("acc", "output", w, "the running sum", reg=True)),
      (Block("On every rising clock edge: reset clears the sum, otherwise x is added when enabled (wrapping).",
             (("always @(posedge clk) begin", "state changes on the rising clock edge"),
              (f"  if (reset) acc <= {w}'d0;", "synchronous reset clears the sum"),
              (f"  else if ({cond}) acc <= acc + x;", "add x when enabled"),
              ("end", "end of the clocked block"))),),
      f"A {w}-bit accumulator that keeps a running sum.",
      f"Synchronous to the rising edge of clk: reset = 1 sets acc to 0; else if en = 1, acc becomes acc + x "
      f"modulo 2^{w}; else acc holds.", clocked=True)


# ------------------------------------------------------------------------------------------------------ fsm
def _fsm_sample(rng):
  s = rng.choice((3, 4, 5))
  nxt = [[rng.randrange(s) for _ in range(2)] for _ in range(s)]
  nxt[0][1] = rng.randrange(1, s)  # from the reset state, input 1 always leaves it: every machine moves
  outs = [rng.randrange(2) for _ in range(s)]
  if len(set(outs)) == 1:
    outs[rng.randrange(1, s)] ^= 1
  return {"states": s, "next": tuple(tuple(r) for r in nxt), "out": tuple(outs)}


def _fsm_table(p, mutate):
  s, nxt, outs = p["states"], [list(r) for r in p["next"]], p["out"]
  if mutate:  # redirect the reset state's input-1 transition to a state with the other output
    other = [t for t in range(s) if outs[t] != outs[nxt[0][1]]]
    nxt[0][1] = other[0]
  sw = max(1, (s - 1).bit_length())
  table = "\n".join(f"  S{i} | in=0 -> S{p['next'][i][0]}, in=1 -> S{p['next'][i][1]} | out={outs[i]}"
                    for i in range(s))
  trans = [("always @(*) begin", "next-state logic"), ("  case (state)", "by the current state")]
  for i in range(s):
    trans.append((f"    {sw}'d{i}: next = in ? {sw}'d{nxt[i][1]} : {sw}'d{nxt[i][0]};",
                  f"from S{i}: S{nxt[i][1]} on 1, S{nxt[i][0]} on 0"))
  trans += [(f"    default: next = {sw}'d0;", "unused encodings return to S0"), ("  endcase", "end of the case"),
            ("end", "end of the next-state logic")]
  ones = [f"{sw}'d{i}" for i in range(s) if outs[i]]
  return Design(
      (_CLK, _RST, Port("in", "input", 1, "the input bit"), Port("out", "output", 1, "the Moore output")),
      (Block("Declares the state register and the next-state signal.",
             ((f"reg {_w(sw)}state, next;", f"{s} states encoded in {sw} bit(s)"),)),
       Block("Computes the next state from the current state and the input, following the transition table.",
             tuple(trans)),
       Block("Updates the state on the rising clock edge; reset returns to S0.",
             (("always @(posedge clk) begin", "state register"),
              (f"  if (reset) state <= {sw}'d0;", "synchronous reset to S0"),
              ("  else state <= next;", "take the transition"),
              ("end", "end of the state register"))),
       Block("Drives the Moore output from the current state.",
             ((f"assign out = {' || '.join(f'state == {o}' for o in ones)};",
               "out is 1 in states " + ", ".join(f"S{i}" for i in range(s) if outs[i])),))),
      f"A {s}-state finite state machine that reacts to a 1-bit input.",
      f"A Moore machine with states S0..S{s - 1}, reset state S0 (synchronous active-high reset), transitions "
      f"on the rising clock edge, and out depending on the current state only. Transition table "
      f"(state | next states | output):\n{table}", clocked=True)


def _seq_sample(rng):
  n = rng.choice((3, 4))
  return {"pattern": "".join(rng.choice("01") for _ in range(n))}


def _sequence_detector(p, mutate):
  pat = p["pattern"]
  n = len(pat)
  pm = pat[:-1] + ("0" if pat[-1] == "1" else "1") if mutate else pat
  return Design(
      (_CLK, _RST, Port("in", "input", 1, "serial input bit"),
       Port("found", "output", 1, f"1 when the last {n} input bits were {pat}")),
      (Block(f"Keeps the last {n} input bits in a shift register, newest bit lowest; reset clears it.",
             ((f"reg [{n - 1}:0] hist;", f"the last {n} inputs"),
              ("reg [2:0] seen;", "how many bits have been shifted in since reset, saturating"),
              ("always @(posedge clk) begin", "history register"),
              ("  if (reset) begin hist <= 0; seen <= 0; end", "synchronous reset clears the history"),
              (f"  else begin hist <= {{hist[{n - 2}:0], in}}; if (seen < {n}) seen <= seen + 1; end",
               "shift the new bit in and count it"),
              ("end", "end of the history register"))),
       Block(f"Flags a match once {n} bits have arrived and the history equals the pattern {pat}.",
             ((f"assign found = (seen >= {n}) && (hist == {n}'b{pm});", f"match the pattern {pat}"),))),
      f"A detector that recognises the bit sequence {pat} in a serial input.",
      f"At every rising clock edge the input bit is shifted into a history of the last {n} bits (reset clears it). "
      f"found is 1 while the last {n} bits received, oldest first, are {pat} (overlapping matches count), and "
      f"0 until {n} bits have arrived since reset.", clocked=True)


def _widths(*ws):
  return lambda rng: rng.choice(ws)


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("bitwise", "logic", lambda r: {"op": r.choice(sorted(_BITWISE)), "width": r.choice((1, 2, 4, 8, 16))},
             _bitwise),
    Template("reduce", "logic", lambda r: {"op": r.choice(sorted(_REDUCE)), "width": r.choice((3, 4, 8, 12, 16))},
             _reduce),
    Template("mux", "logic", lambda r: {"inputs": r.choice((2, 4)), "width": r.choice((1, 4, 8))}, _mux),
    Template("adder", "arith", lambda r: {"width": r.choice((2, 4, 8, 12, 16))}, _adder),
    Template("subtractor", "arith", lambda r: {"width": r.choice((4, 8, 16))}, _subtractor),
    Template("comparator", "arith", lambda r: {"width": r.choice((4, 8, 16)), "signed": r.random() < 0.5},
             _comparator),
    Template("decoder", "coding", lambda r: {"bits": r.choice((2, 3, 4))}, _decoder),
    Template("priority_encoder", "coding", lambda r: {"width": r.choice((4, 8))}, _priority_encoder),
    Template("popcount", "coding", lambda r: {"width": r.choice((4, 7, 8, 16))}, _popcount),
    Template("gray", "coding", lambda r: {"direction": r.choice(("bin2gray", "gray2bin")),
                                          "width": r.choice((3, 4, 8))}, _gray),
    Template("counter", "sequential", lambda r: {"width": r.choice((3, 4, 8)), "up": r.random() < 0.6,
                                                 "reset_value": r.choice((0, 0, 1, 5))}, _counter),
    Template("shift_register", "sequential", lambda r: {"width": r.choice((4, 8, 16)), "left": r.random() < 0.5},
             _shift_register),
    Template("edge_detector", "sequential", lambda r: {"kind": r.choice(("rising", "falling", "any"))},
             _edge_detector),
    Template("accumulator", "sequential", lambda r: {"width": r.choice((4, 8, 16))}, _accumulator),
    Template("fsm_table", "fsm", _fsm_sample, _fsm_table),
    Template("sequence_detector", "fsm", _seq_sample, _sequence_detector),
)}
FAMILIES = tuple(sorted({t.family for t in TEMPLATES.values()}))


def _rand_expr(width: int) -> str:
  parts = []
  left = width
  while left > 0:
    parts.append("$random(seed)")
    left -= 32
  return "{" + ", ".join(parts) + "}" if len(parts) > 1 else parts[0]


def testbench(design: Design, cycles: int = 200, seed: int = 1) -> str:
  """A VerilogEval-style mismatch testbench: RefModule vs TopModule on seeded random stimulus.

  Inputs change on the falling clock edge (a multi-bit input copies an earlier input of its width 1 time in
  8, so equality corner cases occur); outputs are compared (`===`, so X must match X) 2 time units
  later, which checks combinational outputs under the new inputs and registered outputs after the last rising
  edge. A synchronous reset is held for the first 2 cycles, then asserted with probability 1/16.
  """
  ins = [p for p in design.ports if p.direction == "input" and p.name not in ("clk", "reset")]
  outs = [p for p in design.ports if p.direction == "output"]
  has_reset = any(p.name == "reset" for p in design.ports)
  decl = ["  reg clk = 0;", "  always #5 clk = ~clk;", "  integer seed = %d, errors = 0, clocks = 0, i;" % seed]
  if has_reset:
    decl.append("  reg reset = 1;")
  for p in ins:
    decl.append(f"  reg {_w(p.width)}{p.name} = 0;")
  for p in outs:
    decl.append(f"  wire {_w(p.width)}{p.name}_ref, {p.name}_dut;")
    decl.append(f"  integer errors_{p.name} = 0;")

  def conn(suffix):
    pins = []
    for p in design.ports:
      sig = p.name + (suffix if p.direction == "output" else "")
      pins.append(f".{p.name}({sig})")
    return ", ".join(pins)

  inst = ["  RefModule good (" + conn("_ref") + ");", "  TopModule dut (" + conn("_dut") + ");"]
  stim = ["  initial begin", f"    for (i = 0; i < {cycles}; i = i + 1) begin", "      @(negedge clk);"]
  if has_reset:
    stim.append("      reset = (i < 2) || (($random(seed) & 15) == 0);")
  for i, p in enumerate(ins):
    twin = next((q for q in ins[:i] if q.width == p.width and p.width > 1), None)
    if twin is not None:  # equal operands 1 time in 8: corner cases (a == b) must be exercised too
      stim.append(f"      {p.name} = (($random(seed) & 7) == 0) ? {twin.name} : {_rand_expr(p.width)};")
    else:
      stim.append(f"      {p.name} = {_rand_expr(p.width)};")
  stim.append("      #2;")
  stim.append("      clocks = clocks + 1;")
  cmp = " || ".join(f"({p.name}_ref !== {p.name}_dut)" for p in outs)
  stim.append(f"      if ({cmp}) errors = errors + 1;")
  for p in outs:
    stim.append(f"      if ({p.name}_ref !== {p.name}_dut) errors_{p.name} = errors_{p.name} + 1;")
  stim += ["    end"]
  for p in outs:
    stim.append(f"    $display(\"Hint: Output '%s' has %0d mismatches.\", \"{p.name}\", errors_{p.name});")
  stim += ["    $display(\"Mismatches: %1d in %1d samples\", errors, clocks);", "    $finish;", "  end"]
  return "`timescale 1 ps/1 ps\nmodule tb;\n" + "\n".join(decl + inst + stim) + "\nendmodule\n"


@dataclasses.dataclass(frozen=True)
class Task:
  """One generated task: the template instance, its four descriptions, reference, testbench and mutant."""

  task_id: str
  template: str
  family: str
  params: Mapping[str, Any]
  levels: Mapping[str, str]
  interface: str
  reference: str
  commented_reference: str
  testbench: str
  mutant: str
  block_summaries: tuple[str, ...]
  line_comments: tuple[tuple[int, str], ...]

  def problem(self, level: str = "detailed", reference: str | None = None) -> Problem:
    """The task as a harness `Problem` whose description is the `level` description."""
    if level not in LEVELS:
      raise ValueError(f"level={level!r} must be one of {LEVELS}")
    ref = reference if reference is not None else self.reference
    return Problem(
        task_id=f"{self.task_id}@{level}", benchmark="mg_synthetic", description=self.levels[level],
        top="TopModule", interface=self.interface,
        testbench={"test.sv": self.testbench, "ref.sv": self.reference.replace("module TopModule", "module RefModule")},
        reference=ref, answer_mode="module", design_file="design.sv", sim_top="tb", judge="mismatches",
        meta={"level": level, "template": self.template, "family": self.family, "task": self.task_id})


def describe_levels(design: Design) -> tuple[dict[str, str], tuple[str, ...], tuple[tuple[int, str], ...]]:
  """The four descriptions of a design (plus the block summaries and the (line, comment) pairs)."""
  ports = "\n".join(p.describe() for p in design.ports)
  blocks = tuple(b.summary for b in design.blocks)
  comments, line_no = [], 1 + len(design.ports) + 1  # after the header lines
  for b in design.blocks:
    for _, comment in b.lines:
      line_no += 1
      if comment:
        comments.append((line_no, comment))
  levels = {
      "high_level": design.high_level,
      "detailed": f"{design.high_level}\n\nPorts:\n{ports}\n\nBehaviour: {design.behaviour}",
      "block": "\n".join(f"block_{i}: {s}" for i, s in enumerate(blocks)),
      "line": "\n".join(f"line {n}: {c}" for n, c in comments),
  }
  return levels, blocks, tuple(comments)


def make_task(template: str, params: Mapping[str, Any], cycles: int = 200) -> Task:
  t = TEMPLATES[template]
  design, mutant = t.build(params, False), t.build(params, True)
  levels, blocks, comments = describe_levels(design)
  sig = ",".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "next") + (
      "," + "".join(str(x) for r in params["next"] for x in r) if "next" in params else "")
  return Task(task_id=f"{template}[{sig}]", template=template, family=t.family, params=dict(params),
              levels=levels, interface=header(design.ports), reference=render_code(design),
              commented_reference=render_code(design, comments=True), testbench=testbench(design, cycles),
              mutant=render_code(mutant), block_summaries=blocks, line_comments=comments)


def generate(per_template: int, seed: int = 0, templates: Sequence[str] | None = None,
             cycles: int = 200) -> list[Task]:
  """Up to `per_template` distinct tasks per template (fewer when the template has fewer parameter sets),
  deterministically from `seed`."""
  names = list(templates or TEMPLATES)
  for n in names:
    if n not in TEMPLATES:
      raise ValueError(f"template {n!r} is not one of {sorted(TEMPLATES)}")
  tasks = []
  for name in names:
    rng = random.Random(f"mg-verilog/{seed}/{name}")
    seen: dict[str, Task] = {}
    for _ in range(per_template * 20):
      if len(seen) >= per_template:
        break
      task = make_task(name, TEMPLATES[name].sample(rng), cycles)
      seen.setdefault(task.task_id, task)
    tasks.extend(seen.values())
  return tasks


def split(tasks: Sequence[Task], by: str, held_out: Sequence[str] = (), test_fraction: float = 0.25,
          seed: int = 0) -> tuple[list[Task], list[Task]]:
  """(train, test): by "family" or "template" (the named ones held out), or by "params" (a seeded fraction
  of every template's instances held out)."""
  if by in ("family", "template"):
    names = FAMILIES if by == "family" else tuple(TEMPLATES)
    bad = [h for h in held_out if h not in names]
    if bad or not held_out:
      raise ValueError(f"held_out={list(held_out)!r} must name some of the {by}s {list(names)}")
    test = [t for t in tasks if getattr(t, by) in held_out]
    return [t for t in tasks if getattr(t, by) not in held_out], test
  if by == "params":
    if not 0 < test_fraction < 1:
      raise ValueError(f"test_fraction={test_fraction!r} must be in (0, 1)")
    train, test = [], []
    for name in TEMPLATES:
      group = [t for t in tasks if t.template == name]
      random.Random(f"split/{seed}/{name}").shuffle(group)
      k = max(1, int(round(len(group) * test_fraction))) if len(group) > 1 else 0
      test += group[:k]
      train += group[k:]
    return train, test
  raise ValueError(f"split by={by!r} must be 'family', 'template' or 'params'")
