"""Spec2RTL-Agent: each reflection path taken by a planted failure of its kind, intervention counts, the job.

Every run goes through the real tools (sandboxed Python, g++, XLS, iverilog; yosys where synthesis is on) on the
shipped crc8 spec, with the reference-replaying backend and planted answers (`reference.PlantedBackend`).
"""

import json
import os
import tempfile

from absl.testing import absltest
from ml_collections import config_flags

from lacax.hw import sandbox
from lacax.hw.backends.scripted import ScriptedBackend
from lacax.hw.spec2rtl import agent as agent_lib
from lacax.hw.spec2rtl import execute
from lacax.hw.spec2rtl import reference
from lacax.hw.spec2rtl import spec as spec_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_SYNTAX = "```python\ndef crc8_shift(crc):\n    return crc <<\n```"
BAD_RESULT = "```python\ndef crc8_shift(crc):\n    return (crc << 1) & 0xFF\n```"
# Wrong for bytes with bit 7 set and bit 6 clear (except 0x80), right on the plan's three examples: the bug only
# shows up downstream, in crc8_byte's known-answer vectors.
SUBTLE = {
    "python_coder": "```python\ndef crc8_shift(crc):\n    s = (crc << 1) & 0xFF\n    if crc & 0x80:\n"
                    "        s ^= 0x07 if (crc & 0x40 or crc == 0x80) else 0x05\n    return s\n```",
    "cpp_coder": "```cpp\nuint8_t crc8_shift(uint8_t crc) {\n  uint8_t s = (uint8_t)(crc << 1);\n  if (crc & 0x80) "
                 "s ^= ((crc & 0x40) || crc == 0x80) ? 0x07 : 0x05;\n  return s;\n}\n```",
    "hls_coder": "```dslx\nfn crc8_shift(crc: u8) -> u8 {\n  let s = crc << u8:1;\n  if crc[7:8] == u1:1 {\n"
                 "    if crc[6:7] == u1:1 || crc == u8:0x80 { s ^ u8:0x07 } else { s ^ u8:0x05 }\n  } else { s }\n}\n```",
}


def _wrong_plan() -> str:
  """crc8's plan with the polynomial misread as 0x31 in crc8_shift's examples (a misunderstood spec)."""
  plan = json.loads(json.dumps(reference.load("crc8").plan["subfunctions"]))
  plan[0]["examples"] = [{"args": [0x80], "out": 0x31}, {"args": [0x01], "out": 0x02}]
  plan[0]["plan"] = ["shift left", "if the old bit 7 was 1, XOR with 0x31"]
  return "```json\n" + json.dumps(plan) + "\n```"


def _analysis(path, target=None):
  return json.dumps({"path": path, "target": target, "reason": f"planted analysis: path {path}"})


class ReflectionPathsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.spec = spec_lib.shipped("crc8")

  def run_agent(self, plants, budgets=agent_lib.Budgets(vectors=12), human=None):
    backend = reference.PlantedBackend(reference.reference_backend(), plants)
    run = agent_lib.Agent(backend, budgets=budgets, human=human, synthesize=False).run(self.spec)
    self.assertEqual(sum(len(v) for v in backend.plants.values()), 0, "every planted answer was asked for")
    return run, backend

  def calls(self, run, role, sub=None):
    return [e for e in run.trace if e["event"] == "call" and e["role"] == role and (sub is None or
                                                                                   e["subfunction"] == sub)]

  def test_path3_retry_current_after_two_failed_attempts(self):
    run, backend = self.run_agent({("python_coder", "crc8_shift"): [BAD_SYNTAX, BAD_RESULT]})
    self.assertTrue(run.passed, run.unresolved)
    self.assertEqual([(r["path"], r["stage"], r["subfunction"]) for r in run.reflections],
                     [(3, "python", "crc8_shift")])
    self.assertEqual(run.interventions, [])
    fails = [e for e in run.trace if e["event"] == "check" and e["stage"] == "python" and not e["ok"]]
    self.assertIn("SyntaxError", fails[0]["error"])
    self.assertIn("expected 0x7", fails[1]["error"])  # crc8_shift(0x80) = 0x7 in the plan's examples
    # The prompt optimiser rewrote the Python instructions after the first failure; the retry used them.
    self.assertLen(run.optimisations, 1)
    prompts = [p[0][1]["content"] for p, _ in backend.inner.calls if "role=python_coder" in p[0][1]["content"]]
    self.assertIn("Check every known answer", prompts[-1])
    self.assertIn("Analysis:", prompts[0])  # the retry carries the error and the analysis

  def test_path2_regenerates_the_upstream_subfunction(self):
    plants = {(role, "crc8_shift"): [text] for role, text in SUBTLE.items()}
    plants[("error_analyzer", "crc8_byte")] = [_analysis(2, "crc8_shift")]
    run, _ = self.run_agent(plants)
    self.assertTrue(run.passed, run.unresolved)
    self.assertEqual([(r["path"], r["target"], r["subfunction"], r["stage"]) for r in run.reflections],
                     [(2, "crc8_shift", "crc8_byte", "python")])
    # crc8_shift's own checks passed the bug (it is consistent in Python, C++ and DSLX) ...
    first = [e for e in run.trace if e["event"] == "check" and e.get("subfunction") == "crc8_shift"][:4]
    self.assertTrue(all(e["ok"] for e in first))
    # ... crc8_byte failed on the spec's vectors, and crc8_shift was coded again from pseudocode.
    self.assertLen(self.calls(run, "pseudocode_coder", "crc8_shift"), 2)
    self.assertLen(self.calls(run, "python_coder", "crc8_shift"), 2)
    self.assertEqual(run.interventions, [])

  def test_path1_revises_understanding(self):
    run, _ = self.run_agent({("decomposer", None): [_wrong_plan()],
                             ("error_analyzer", "crc8_shift"): [_analysis(1)]})
    self.assertTrue(run.passed, run.unresolved)
    self.assertEqual([r["path"] for r in run.reflections], [1])
    self.assertLen(self.calls(run, "decomposer"), 2)
    self.assertLen(self.calls(run, "summarizer"), 2)
    self.assertEqual(run.interventions, [])
    self.assertEqual(run.plan[0]["examples"][0], {"args": [0x80], "out": 0x07})

  def test_path4_escalates_to_a_human(self):
    run, _ = self.run_agent({("python_coder", "crc8_shift"): [BAD_SYNTAX, BAD_RESULT],
                             ("error_analyzer", "crc8_shift"): [_analysis(4)]})
    self.assertTrue(run.passed, run.unresolved)
    self.assertEqual([r["path"] for r in run.reflections], [4])
    self.assertEqual([(i["stage"], i["subfunction"], i["reason"]) for i in run.interventions],
                     [("python", "crc8_shift", "escalated")])
    self.assertEqual(run.code["crc8_shift"]["python"], reference.load("crc8").code[("crc8_shift", "python")])

  def test_intervention_count_matches_the_script(self):
    # 1: no valid plan in 2 rounds (budget); 2: cpp of crc8_byte escalated (path 4); 3: after the one allowed
    # reflection is spent, hls of crc8_byte fails again (budget).
    bad_cpp = "```cpp\nuint8_t crc8_byte(uint8_t crc, uint8_t data) { return crc ^ data; }\n```"
    bad_x = "```dslx\npub fn crc8_byte(crc: u8, data: u8) -> u8 { crc }\n```"
    run, _ = self.run_agent({("decomposer", None): ["no plan", "```json\n[{\"name\": \"x\"}]\n```"],
                             ("cpp_coder", "crc8_byte"): [bad_cpp, bad_cpp],
                             ("error_analyzer", "crc8_byte"): [_analysis(4)],
                             ("hls_coder", "crc8_byte"): [bad_x, bad_x]},
                            budgets=agent_lib.Budgets(plan_rounds=2, reflections=1, vectors=12))
    self.assertTrue(run.passed, run.unresolved)
    self.assertEqual([(i["stage"], i["reason"]) for i in run.interventions],
                     [("understanding", "budget_exhausted"), ("cpp", "escalated"), ("hls", "budget_exhausted")])
    by_stage = run.interventions_by_stage()
    self.assertEqual((by_stage["understanding"], by_stage["cpp"], by_stage["hls"], sum(by_stage.values())),
                     (1, 1, 1, 3))
    self.assertEqual(run.to_json()["interventions"], 3)

  def test_no_human_leaves_the_run_unresolved(self):
    run, _ = self.run_agent({("python_coder", "crc8_shift"): [BAD_SYNTAX, BAD_RESULT],
                             ("error_analyzer", "crc8_shift"): [_analysis(4)]}, human=agent_lib.NoHuman())
    self.assertFalse(run.passed)
    self.assertIn("no human answered", run.unresolved)
    self.assertLen(run.interventions, 1)


class RouterParsingTest(absltest.TestCase):
  """The analyser's answer is validated (no tools run here)."""

  def analyse(self, answer, k=1):
    spec = spec_lib.shipped("crc8")
    plan = reference.load("crc8").plan["subfunctions"]
    agent = agent_lib.Agent(ScriptedBackend(default=lambda p, j: answer))
    return agent._analyse(agent_lib.SpecRun("crc8"), spec, plan, k, "python", "boom", {})

  def test_paths(self):
    self.assertEqual(self.analyse(_analysis(2, "crc8_shift"))["path"], 2)
    bad_target = self.analyse(_analysis(2, "crc8_byte"))  # not an *earlier* sub-function
    self.assertEqual((bad_target["path"], bad_target["target"]), (3, None))
    self.assertIn("not an earlier", bad_target["note"])
    self.assertEqual(self.analyse("I think it is Path 4: ask someone.")["path"], 4)
    unparsable = self.analyse("no idea")
    self.assertEqual(unparsable["path"], 3)
    self.assertIn("unparsable", unparsable["note"])


class SandboxTest(absltest.TestCase):

  def test_model_python_runs_in_the_sandbox(self):
    code = ("def probe(x):\n    import os, socket\n    try:\n        socket.create_connection(('1.1.1.1', 53), 1)\n"
            "        net = 1\n    except OSError:\n        net = 0\n    return os.getuid() * 2 + net\n")
    check = execute.run_python(code, "probe", [(0,)], execute.Port("out", 32))
    self.assertTrue(check.ok, check.error)
    uid, net = divmod(check.outputs[0], 2)
    self.assertEqual(net, 0, "no network inside the box")
    if sandbox.isolation()["mode"] == "namespaces":
      self.assertNotEqual(uid, os.getuid())


class JobTest(absltest.TestCase):

  def test_tiny_job_and_resume(self):
    from lacax import runs  # pylint: disable=g-import-not-at-top
    from lacax.jobs import spec2rtl as job  # pylint: disable=g-import-not-at-top
    config = config_flags.config_flags.ConfigFileFlagParser("config").parse(
        os.path.join(_REPO, "configs", "spec2rtl.py") + ":tiny")
    with tempfile.TemporaryDirectory() as tmp:
      run_dir = runs.RunDir(tmp)
      out = job.run(config, run_dir)
      self.assertEqual(out["totals"], {"specs": 1, "passed": 1, "interventions": 0,
                                       "interventions_by_stage": {s: 0 for s in agent_lib.ALL_STAGES},
                                       "reflections": 0, "backend_calls": 12})
      row = out["specs"][0]
      self.assertGreater(row["rtl"]["cells"], 0)
      self.assertEqual(set(row["tools_used"]) >= {"python", "g++", "xls-interpret", "xls-codegen", "iverilog",
                                                  "yosys"}, True)
      for name in ("interventions.png", "specs/crc8.json", "specs/crc8.v"):
        self.assertTrue(os.path.isfile(os.path.join(tmp, name)), name)
      self.assertEqual(run_dir.finished_units(), ["spec:crc8"])
      unit = os.path.join(tmp, "units", os.listdir(os.path.join(tmp, "units"))[0])
      before = os.path.getmtime(unit)
      again = job.run(config, run_dir)  # resume: the finished spec is read back, not recomputed
      self.assertEqual(os.path.getmtime(unit), before)
      self.assertEqual(again["specs"], out["specs"])

  def test_openai_compatible_server(self):
    # A fake OpenAI-compatible server on 127.0.0.1 that answers chats with the reference answers.
    import http.server  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    from lacax import runs  # pylint: disable=g-import-not-at-top
    from lacax.jobs import spec2rtl as job  # pylint: disable=g-import-not-at-top

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):  # pylint: disable=invalid-name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = reference.reference_answer(body["messages"])
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

      def log_message(self, *args):
        pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    self.addCleanup(server.shutdown)
    config = config_flags.config_flags.ConfigFileFlagParser("config").parse(
        os.path.join(_REPO, "configs", "spec2rtl.py") + ":tiny")
    with config.unlocked():
      config.backend.kind = "openai_http"
      config.backend.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
      config.backend.model = "fake"
      config.synthesize = False
    with tempfile.TemporaryDirectory() as tmp:
      out = job.run(config, runs.RunDir(tmp))
    self.assertEqual((out["totals"]["passed"], out["totals"]["interventions"]), (1, 0))
    self.assertEqual(out["backend"]["kind"], "openai_http")

  def test_validation_names_the_field(self):
    from lacax import errors  # pylint: disable=g-import-not-at-top
    from lacax.jobs import spec2rtl as job  # pylint: disable=g-import-not-at-top
    config = config_flags.config_flags.ConfigFileFlagParser("config").parse(
        os.path.join(_REPO, "configs", "spec2rtl.py") + ":tiny")
    with config.unlocked():
      config.specs = "crc8,nosuchspec"
      config.backend.kind = "magic"
      config.budgets.attempts = 0
    with self.assertRaises(errors.ValidationError) as e:
      job.validate(config)
    text = str(e.exception)
    for part in ("nosuchspec", "backend.kind='magic'", "budgets.attempts=0"):
      self.assertIn(part, text)


if __name__ == "__main__":
  absltest.main()
