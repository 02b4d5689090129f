"""Spec2RTL specs: the documented format, named errors for bad files, shipped vectors against Python's own
implementations, every shipped spec through the whole pipeline to co-simulated RTL, and a user's own spec file."""

import binascii
import json
import math
import os
import tempfile
import zlib

from absl.testing import absltest
from absl.testing import parameterized

from lacax.hw.backends.scripted import ScriptedBackend
from lacax.hw.spec2rtl import agent as agent_lib
from lacax.hw.spec2rtl import reference
from lacax.hw.spec2rtl import roles
from lacax.hw.spec2rtl import spec as spec_lib

GOOD = """spec: parity8
title: even parity of a byte
top: parity8

## Interface
- input x: u8 -- the byte
- output out: u1 -- 1 when x has an odd number of ones

## Behaviour
out is the XOR of the eight bits of x.

## Vectors
x=0 -> 0
x=1 -> 1
x=0xFF -> 0
x=0x07 -> 1
"""


def _crc8(crc, data):
  c = crc ^ data
  for _ in range(8):
    c = ((c << 1) ^ 0x07) & 0xFF if c & 0x80 else (c << 1) & 0xFF
  return c


ORACLES = {  # Python's own implementations (and, for CRC-8, the catalogue's check value, tested below)
    "crc8": _crc8,
    "crc16": lambda crc, data: binascii.crc_hqx(bytes([data]), crc),
    "crc32": lambda crc, data: ~zlib.crc32(bytes([data]), ~crc & 0xFFFFFFFF) & 0xFFFFFFFF,
    "gcd": math.gcd,
    "fir8": lambda *x: sum(h * v for h, v in zip([1, 3, 5, 7, 7, 5, 3, 1], x)),
    "alu": lambda op, a, b: [(a + b) & 255, (a - b) & 255, a & b, a | b, a ^ b, (a << (b & 7)) & 255,
                             a >> (b & 7), int(a < b)][op],
}


class SpecFormatTest(parameterized.TestCase):

  def test_parse(self):
    s = spec_lib.parse_spec(GOOD)
    self.assertEqual((s.name, s.top, s.pipeline_stages), ("parity8", "parity8", 0))
    self.assertEqual([(p.name, p.width) for p in s.inputs], [("x", 8)])
    self.assertEqual((s.output.name, s.output.width), ("out", 1))
    self.assertEqual([(v.inputs, v.output) for v in s.vectors], [((0,), 0), ((1,), 1), ((255,), 0), ((7,), 1)])

  @parameterized.named_parameters(
      ("no_top", GOOD.replace("top: parity8\n", ""), "no 'top:' line", None),
      ("bad_name", GOOD.replace("spec: parity8", "spec: parity-8"), "spec='parity-8' must be an identifier", 1),
      ("no_vectors", GOOD.split("## Vectors")[0], "'## Vectors' is missing", None),
      ("width", GOOD.replace("x: u8", "x: u65"), "width 'u65' must be uW with W in 1..64", 6),
      ("port_syntax", GOOD.replace("- input x: u8", "- inout x: u8"), "must read '- input|output NAME", 6),
      ("two_outputs", GOOD.replace("## Behaviour", "- output y: u1 -- more\n\n## Behaviour"),
       "exactly one output port, found 2", None),
      ("vector_names", GOOD.replace("x=1 -> 1", "y=1 -> 1"), "must be exactly the inputs ['x']", 14),
      ("vector_fit", GOOD.replace("x=1 -> 1", "x=256 -> 1"), "x=256 does not fit u8", 14),
      ("output_fit", GOOD.replace("x=1 -> 1", "x=1 -> 2"), "expected output 2 does not fit u1", 14),
      ("vector_value", GOOD.replace("x=1 -> 1", "x=one -> 1"), "'one' of 'x' is not a decimal", 14),
      ("stages", GOOD.replace("top: parity8", "top: parity8\npipeline_stages: fast"), "pipeline_stages='fast'", 4),
      ("empty_behaviour", GOOD.replace("out is the XOR of the eight bits of x.", ""), "'## Behaviour' is empty",
       None),
  )
  def test_bad_spec_named_error(self, text, message, line):
    with self.assertRaises(spec_lib.SpecError) as e:
      spec_lib.parse_spec(text, "my.md")
    self.assertIn(message, str(e.exception))
    self.assertEqual(e.exception.path, "my.md")
    self.assertEqual(e.exception.where, f"line {line}" if line else None)

  def test_bad_files(self):
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(spec_lib.SpecError, "no such spec file"):
        spec_lib.load_spec(os.path.join(tmp, "missing.md"))
      path = os.path.join(tmp, "latin1.md")
      with open(path, "wb") as f:
        f.write(GOOD.replace("XOR", "X\xd6R").encode("latin-1"))
      with self.assertRaisesRegex(spec_lib.SpecError, "not UTF-8"):
        spec_lib.load_spec(path)
    from lacax import errors  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(errors.ConfigError, "'crc64' is not shipped"):
      spec_lib.resolve("crc64")

  def test_shipped_vectors_match_python(self):
    self.assertEqual(spec_lib.shipped_names(), sorted(ORACLES))
    for name, oracle in ORACLES.items():
      s = spec_lib.shipped(name)
      self.assertGreaterEqual(len(s.vectors), 20, name)
      for v in s.vectors:
        self.assertEqual(oracle(*v.inputs), v.output, f"{name} {v}")
    c = 0
    for b in b"123456789":
      c = _crc8(c, b)
    self.assertEqual(c, 0xF4)  # CRC-8/SMBUS check value


class ShippedPipelineTest(parameterized.TestCase):
  """Every shipped spec, reference stage outputs replayed: Python, g++, XLS interpret, XLS codegen and iverilog
  co-simulation all pass (yosys is exercised by the job test)."""

  @parameterized.parameters(*sorted(ORACLES))
  def test_reference_replay_passes_cosimulation(self, name):
    s = spec_lib.shipped(name)
    run = agent_lib.Agent(reference.reference_backend(), budgets=agent_lib.Budgets(vectors=12),
                          synthesize=False).run(s)
    self.assertTrue(run.passed, run.unresolved)
    self.assertEqual((run.interventions, run.reflections), ([], []))
    self.assertEqual(set(run.tools_used()), {"structure", "verifier", "python", "g++", "xls-interpret",
                                             "xls-codegen", "iverilog"})
    self.assertEqual(run.rtl["sim_category"], "pass")
    self.assertGreaterEqual(run.rtl["samples"], len(s.vectors))
    self.assertIn(f"module {s.top}(", run.verilog)
    self.assertEqual("clk" in run.verilog.split(");")[0], s.pipeline_stages > 0)


def _user_backend() -> ScriptedBackend:
  """A scripted 'model' for the user's parity spec (no references exist for it)."""
  plan = [{"name": "parity8", "function": "xor of the bits", "inputs": [{"name": "x", "width": 8}],
           "output": {"name": "out", "width": 1}, "plan": ["fold xor"], "depends": [], "examples": []}]
  code = {
      "pseudocode_coder": "parity8(x): p <- 0; for each bit b of x: p <- p xor b; return p",
      "python_coder": "```python\ndef parity8(x):\n    return bin(x).count('1') & 1\n```",
      "cpp_coder": "```cpp\nuint8_t parity8(uint8_t x) { return __builtin_parity(x); }\n```",
      "hls_coder": "```dslx\npub fn parity8(x: u8) -> u1 { xor_reduce(x) }\n```",
  }

  def answer(prompt, j):
    role = roles.parse_tag(prompt)["role"]
    if role == "decomposer":
      return "```json\n" + json.dumps(plan) + "\n```"
    if role == "verifier":
      return "PASS"
    return code.get(role, "parity of x")

  return ScriptedBackend(default=answer)


class UserSpecTest(absltest.TestCase):

  def test_user_spec_file_runs_the_same_way(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "parity8.md")
      with open(path, "w") as f:
        f.write(GOOD)
      s = spec_lib.resolve(path)
    self.assertIsNone(reference.load(s))
    run = agent_lib.Agent(_user_backend(), budgets=agent_lib.Budgets(vectors=12), synthesize=False).run(s)
    self.assertTrue(run.passed, run.unresolved)
    self.assertEqual(run.interventions, [])
    # Without references the reference human cannot answer: an escalation leaves the run unresolved.
    run = agent_lib.Agent(ScriptedBackend(default=lambda p, j: "PASS"), budgets=agent_lib.Budgets(plan_rounds=1),
                          synthesize=False).run(s)
    self.assertFalse(run.passed)
    self.assertEqual([i["stage"] for i in run.interventions], ["understanding"])


if __name__ == "__main__":
  absltest.main()
