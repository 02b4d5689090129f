"""Specification documents: the input of Spec2RTL-Agent, in one documented text format.

A spec file is plain text (Markdown-like): header lines `key: value`, then sections that start with `## `.

    spec: crc32
    title: CRC-32 byte update (IEEE 802.3 / zlib)
    top: crc32_byte
    pipeline_stages: 0

    ## Interface
    - input crc: u32 -- the CRC register before the byte
    - input data: u8 -- the message byte
    - output out: u32 -- the CRC register after the byte

    ## Behaviour
    Free prose: what the design computes, the algorithm, the conventions (bit order, widths, corner cases).

    ## Vectors
    crc=0xFFFFFFFF data=0x31 -> 0x4A1B6F08
    crc=0 data=0 -> 0

Header fields: `spec` (an identifier: the spec's name), `title` (free text), `top` (an identifier: the name of
the top function and of the RTL module), `pipeline_stages` (0 = combinational RTL; N >= 2 = an N-stage XLS
pipeline with a clock `clk` and registers between stages, not at the ports: an output N - 1 cycles after its
inputs). Interface: one line per port, `- input|output NAME: uW -- text`, W in
1..64, at least one input and exactly one output (the generated RTL names its output port `out`, XLS's
convention). Vectors: known-answer vectors, `name=value ...` over every input, `->`, the output value (decimal
or 0x hex); at least one. Any other section (`## Notes`, ...) is kept as prose and shown to the agents.

Shipped specs live in `lacax/hw/spec2rtl/specs/<name>/spec.md`, beside the reference stage outputs of
`reference.py`. `load_spec(path)` reads a user's own file the same way; every problem is a `SpecError` naming
the file, the line and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from lacax import errors

SPECS_DIR = os.path.join(os.path.dirname(__file__), "specs")
MAX_WIDTH = 64
REQUIRED_SECTIONS = ("Interface", "Behaviour", "Vectors")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PORT_RE = re.compile(r"^-\s*(input|output)\s+(\S+?)\s*:\s*(\S+)\s*(?:(?:--|—|-|:)\s*)?(.*)$")
_RESERVED = {"clk", "out_valid", "rst"}


class SpecError(errors.FileFormatError):
  """A spec file does not follow the documented format (the message names the file, the line and the problem)."""


@dataclasses.dataclass(frozen=True)
class Port:
  """One port: direction "input" / "output", name, width in bits, description."""

  direction: str
  name: str
  width: int
  text: str = ""

  @property
  def mask(self) -> int:
    return (1 << self.width) - 1

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "width": self.width}


@dataclasses.dataclass(frozen=True)
class Vector:
  """One known-answer vector: input values (in interface order) and the expected output."""

  inputs: tuple[int, ...]
  output: int


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed specification document.

  Attributes:
    name, title, top: header fields.
    pipeline_stages: 0 = combinational RTL, N = N-stage pipeline.
    inputs, output: the interface.
    sections: {section title: prose}, every section (Interface and Vectors included, as written).
    vectors: the known-answer vectors.
    text: the whole document, as given to the agents.
    path: the file it came from ("" for text).
  """

  name: str
  title: str
  top: str
  pipeline_stages: int
  inputs: tuple[Port, ...]
  output: Port
  sections: dict[str, str]
  vectors: tuple[Vector, ...]
  text: str
  path: str = ""

  @property
  def behaviour(self) -> str:
    return self.sections["Behaviour"]

  def interface_json(self) -> dict[str, Any]:
    return {"inputs": [p.to_json() for p in self.inputs], "output": self.output.to_json()}


def _int(value: str) -> int:
  value = value.strip().replace("_", "")
  return int(value, 16) if value.lower().startswith("0x") else int(value, 10)


def parse_spec(text: str, path: str = "<text>") -> Spec:
  """Parses a spec document (see the module docstring); raises SpecError on the first problem."""

  def fail(problem: str, line: int | None = None):
    raise SpecError(path, problem, f"line {line}" if line else None)

  header: dict[str, tuple[str, int]] = {}
  sections: dict[str, list[tuple[int, str]]] = {}
  current = None
  for lineno, raw in enumerate(text.splitlines(), 1):
    line = raw.rstrip()
    if line.startswith("## "):
      current = line[3:].strip()
      if current in sections:
        fail(f"section '## {current}' appears twice", lineno)
      sections[current] = []
    elif current is None:
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      m = re.match(r"^([A-Za-z_]+)\s*:\s*(.*)$", line)
      if not m:
        fail(f"expected a header line 'key: value' before the first '## ' section, got {line.strip()!r}", lineno)
      header[m.group(1)] = (m.group(2).strip(), lineno)
    else:
      sections[current].append((lineno, line))
  for key in ("spec", "top"):
    if key not in header:
      fail(f"the header has no '{key}:' line (expected e.g. '{key}: crc32')")
  for key in ("spec", "top"):
    value, lineno = header[key]
    if not _IDENT.fullmatch(value):
      fail(f"{key}={value!r} must be an identifier (letters, digits, '_')", lineno)
  stages_text, stages_line = header.get("pipeline_stages", ("0", None))
  try:
    stages = int(stages_text)
  except ValueError:
    stages = -1
  if stages < 0 or stages > 8:
    fail(f"pipeline_stages={stages_text!r} must be an integer in 0..8 (0 = combinational)", stages_line)
  for name in REQUIRED_SECTIONS:
    if name not in sections:
      fail(f"the section '## {name}' is missing (required: {', '.join(REQUIRED_SECTIONS)})")

  inputs, outputs, seen = [], [], set()
  for lineno, line in sections["Interface"]:
    if not line.strip():
      continue
    m = _PORT_RE.match(line.strip())
    if not m:
      fail(f"interface line {line.strip()!r} must read '- input|output NAME: uW -- description'", lineno)
    direction, name, width_text, desc = m.groups()
    if not _IDENT.fullmatch(name):
      fail(f"port name {name!r} must be an identifier", lineno)
    if name in seen or name in _RESERVED:
      fail(f"port name {name!r} is {'used twice' if name in seen else 'reserved'}", lineno)
    seen.add(name)
    wm = re.fullmatch(r"u(\d+)", width_text)
    width = int(wm.group(1)) if wm else 0
    if not 1 <= width <= MAX_WIDTH:
      fail(f"port {name!r}: width {width_text!r} must be uW with W in 1..{MAX_WIDTH}", lineno)
    (inputs if direction == "input" else outputs).append(Port(direction, name, width, desc.strip()))
  if not inputs:
    fail("the interface has no input port")
  if len(outputs) != 1:
    fail(f"the interface must have exactly one output port, found {len(outputs)}")
  output = outputs[0]

  behaviour = "\n".join(l for _, l in sections["Behaviour"]).strip()
  if not behaviour:
    fail("the section '## Behaviour' is empty: describe what the design computes")

  names = [p.name for p in inputs]
  vectors = []
  for lineno, line in sections["Vectors"]:
    if not line.strip() or line.strip().startswith("#"):
      continue
    if "->" not in line:
      fail(f"vector {line.strip()!r} must read 'name=value ... -> value'", lineno)
    left, right = line.split("->", 1)
    values: dict[str, int] = {}
    for item in left.split():
      if "=" not in item:
        fail(f"vector item {item!r} must be name=value", lineno)
      key, value = item.split("=", 1)
      try:
        values[key] = _int(value)
      except ValueError:
        fail(f"vector value {value!r} of {key!r} is not a decimal or 0x hex integer", lineno)
    if sorted(values) != sorted(names):
      fail(f"vector names {sorted(values)} must be exactly the inputs {sorted(names)}", lineno)
    for p in inputs:
      if not 0 <= values[p.name] <= p.mask:
        fail(f"vector value {p.name}={values[p.name]} does not fit u{p.width}", lineno)
    try:
      expected = _int(right.split("=", 1)[-1])
    except ValueError:
      fail(f"expected output {right.strip()!r} is not a decimal or 0x hex integer", lineno)
    if not 0 <= expected <= output.mask:
      fail(f"expected output {expected} does not fit u{output.width}", lineno)
    vectors.append(Vector(tuple(values[n] for n in names), expected))
  if not vectors:
    fail("the section '## Vectors' has no known-answer vector")

  return Spec(name=header["spec"][0], title=header.get("title", (header["spec"][0], 0))[0], top=header["top"][0],
              pipeline_stages=stages, inputs=tuple(inputs), output=output,
              sections={k: "\n".join(l for _, l in v).strip() for k, v in sections.items()},
              vectors=tuple(vectors), text=text, path=path)


def load_spec(path: str) -> Spec:
  """Reads and parses a spec file; a missing or non-UTF-8 file is a SpecError too."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise SpecError(path, "no such spec file") from None
  except UnicodeDecodeError as e:
    raise SpecError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
  except OSError as e:
    raise SpecError(path, f"cannot be read ({e.strerror or e})") from None
  return parse_spec(text, path)


def shipped_names() -> list[str]:
  """Names of the specs shipped with lacax (the default task set)."""
  return sorted(d for d in os.listdir(SPECS_DIR) if os.path.isfile(os.path.join(SPECS_DIR, d, "spec.md")))


def shipped(name: str) -> Spec:
  """A shipped spec by name."""
  if name not in shipped_names():
    raise errors.ConfigError(f"spec {name!r} is not shipped (shipped: {', '.join(shipped_names())}); give a path "
                             "to your own spec file instead")
  return load_spec(os.path.join(SPECS_DIR, name, "spec.md"))


def resolve(name_or_path: str) -> Spec:
  """A shipped spec by name, or a spec file by path (anything with a '/' or ending in .md / .txt / .spec)."""
  if "/" in name_or_path or name_or_path.endswith((".md", ".txt", ".spec")):
    return load_spec(name_or_path)
  return shipped(name_or_path)
