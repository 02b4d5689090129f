"""ScaleRTL: KV-cache continuation, reflection through a running `lacax serve`, the budget, N = 0, planted-bug fail
-> pass, verified traces, the :tiny job."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest

from lacax import train
from lacax.hw.backends import base
from lacax.hw.backends import local
from lacax.hw.backends import openai_http
from lacax.hw.backends import session as session_lib
from lacax.hw.bench import harness
from lacax.hw.bench.problem import render_prompt
from lacax.hw.mg_verilog import tasks as tasks_lib
from lacax.hw.scale_rtl import planted, reflect, rules, scaling
from lacax.hw.scale_rtl import traces as traces_lib
from lacax.serve import Service
from tests.test_backends import BACKEND_ARGS, char_tokenizer, tiny_model

PROMPTS = ("module a b", "always clk")


class KVContinuationTest(absltest.TestCase):
  """One tiny random model; the reflection runs are shared by the tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tiny_model()
    cls.backend = local.LocalBackend(cls.model, **BACKEND_ARGS)
    cls.greedy = base.Sampling(n=1, temperature=0.0, max_tokens=12, seed=0)
    plain = cls.backend.generate(list(PROMPTS), cls.greedy)
    # A "think" marker the greedy model actually writes in its first round (2 characters in): the round ends
    # there, the marker is suppressed and the cue goes in.
    text = plain[0][0].text
    cls.marker = text[2:4]
    cls.config = reflect.ReflectConfig(rounds=2, format="think", think_close=cls.marker, cue=" wait, check:",
                                       answer_tokens=4)
    before = dict(cls.backend.counters)
    cls.kv = reflect.reflect(cls.backend, list(PROMPTS), cls.greedy, cls.config)
    cls.kv_counters = {k: cls.backend.counters[k] - before.get(k, 0) for k in cls.backend.counters}
    before = dict(cls.backend.counters)
    cls.text = reflect.reflect(cls.backend, list(PROMPTS), cls.greedy,
                               dataclasses.replace(cls.config, continuation="text"))
    cls.text_counters = {k: cls.backend.counters[k] - before.get(k, 0) for k in cls.backend.counters}

  def test_cue_and_continuation_reuse_the_cache(self):
    tok = self.model.tokenizer
    prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS)
    t0 = self.kv[0][0]
    self.assertGreaterEqual(len(t0.rounds), 2, "the marker must have triggered a cue")
    # One prefill of the prompts, never again; each cue enters as its own tokens + the re-fed last token.
    self.assertEqual(self.kv_counters["prefill_tokens"], prompt_tokens)
    cues = [r for ts in self.kv for t in ts for r in t.rounds if r.cue]
    forced = [t for ts in self.kv for t in ts if t.answer]  # the end-of-think marker forced after the budget
    marker_tokens = len(tok.encode("\n" + self.marker + "\n", add_bos=False))
    self.assertEqual(self.kv_counters["extend_tokens"],
                     sum(r.cue_tokens + 1 for r in cues) + len(forced) * (marker_tokens + 1))
    # The raw-prefix path prefills everything so far again at every round, for the same tokens.
    self.assertGreater(self.text_counters["prefill_tokens"], prompt_tokens + sum(r.tokens for r in cues))
    for kv_ts, text_ts in zip(self.kv, self.text):
      self.assertEqual([r.text for r in kv_ts[0].rounds], [r.text for r in text_ts[0].rounds])

  def test_continuation_equals_a_fresh_prefill_of_the_transcript(self):
    tok = self.model.tokenizer
    t0 = self.kv[0][0]
    transcript = t0.rounds[0].text.split(self.marker)[0] + t0.rounds[0].cue  # marker suppressed, cue in
    ref = self.backend.continue_([PROMPTS[0]], [tok.encode(transcript, add_bos=False)],
                                 dataclasses.replace(self.greedy, max_tokens=t0.rounds[1].tokens))
    self.assertEqual(ref[0][0].text.split(self.marker)[0], t0.rounds[1].text)

  def test_n0_is_plain_sampling(self):
    sampled = base.Sampling(n=2, temperature=0.9, top_p=0.95, max_tokens=10, seed=5)
    plain = self.backend.generate(list(PROMPTS), sampled)
    for cont in ("kv", "text"):
      traces = reflect.reflect(self.backend, list(PROMPTS), sampled,
                               reflect.ReflectConfig(rounds=0, continuation=cont))
      for ps, ts in zip(plain, traces):
        self.assertEqual([c.text for c in ps], [t.rounds[0].text for t in ts], cont)
        self.assertEqual([len(c.tokens) for c in ps], [t.generated_tokens for t in ts], cont)
        self.assertEqual([len(t.rounds) for t in ts], [1, 1])

  def test_budget_is_never_exceeded(self):
    sampled = base.Sampling(n=2, temperature=1.0, max_tokens=12, seed=1)
    for budget in (3, 7, 17, 26):
      traces = reflect.reflect(self.backend, list(PROMPTS), sampled,
                               dataclasses.replace(self.config, rounds=3, budget=budget))
      for t in (t for ts in traces for t in ts):
        self.assertLessEqual(t.generated_tokens, budget)
        self.assertTrue(t.stop == "budget" or t.generated_tokens < budget, (t.stop, t.generated_tokens))


class SessionRowsTest(absltest.TestCase):
  """A continuation decodes only the rows that continue, in a cache grown for the round, and leaves the other rows'
  caches as they were."""

  def test_a_continuation_runs_only_its_rows_in_a_cache_grown_for_it(self):
    model = tiny_model()
    tok = model.tokenizer
    backend = local.LocalBackend(model, chunk=4, bucket=64, max_batch=8, min_batch=1)
    greedy = base.Sampling(n=1, temperature=0.0, max_tokens=8, seed=0)
    prompts = [*PROMPTS, "wire x", "reg y"]
    s = session_lib.KVSession(backend, [backend.encode_prompt(p) for p in prompts], greedy, capacity=256,
                              grow_by=64)
    widths = []
    decode = session_lib.generation.decode

    def counting_decode(params, state, **kw):
      widths.append(int(state.token.shape[0]))
      return decode(params, state, **kw)

    with mock.patch.object(session_lib.generation, "decode", counting_decode):
      s.run([8] * 4)
      self.assertEqual(s.state.cache.capacity, 64)  # a 64-token prompt bucket, 8 (+ 24 of the loop's bucket)
      first = [list(t) for t in s.transcripts]
      cue = tok.encode(" wait", add_bos=False)
      widths.clear()
      second = s.run([40, 8, 8, 8], append=[cue, None, None, None])
      self.assertEqual(set(widths), {1})  # row 0 alone
      self.assertEqual(s.state.cache.capacity, 128)  # grown for its 40 more tokens
      self.assertEqual(second[1:], [None, None, None])
      widths.clear()
      third = s.run([8, 8, 8, 8], append=[None, None, cue, cue])
      self.assertEqual(set(widths), {2})
    ref = backend.continue_([prompts[0]], [first[0] + cue], dataclasses.replace(greedy, max_tokens=40))
    self.assertEqual(second[0].tokens, ref[0][0].tokens)
    for b in (2, 3):  # rows left alone for a round kept their caches
      ref = backend.continue_([prompts[b]], [first[b] + cue], greedy)
      self.assertEqual(third[b].tokens, ref[0][0].tokens, b)


class ServedReflectionTest(absltest.TestCase):
  """Reflection through a running `lacax serve` (the OpenAI-compatible HTTP backend, raw-prefix continuation)
  gives the rounds the local backend gives from its KV cache, counted exactly from the server's logprobs."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tiny_model()
    cls.local = local.LocalBackend(cls.model, **BACKEND_ARGS)
    cls.service = Service(cls.local, model_name="tiny", batch_window_s=0.05).start()
    cls.remote = openai_http.OpenAIHTTPBackend(cls.service.base_url, "tiny", timeout=120)
    cls.greedy = base.Sampling(n=1, temperature=0.0, max_tokens=12, seed=0)
    marker = cls.local.generate([PROMPTS[0]], cls.greedy)[0][0].text[2:4]  # as KVContinuationTest
    cls.config = reflect.ReflectConfig(rounds=2, format="think", think_close=marker, cue=" wait, check:",
                                       answer_tokens=4)

  @classmethod
  def tearDownClass(cls):
    cls.service.stop()
    super().tearDownClass()

  def test_served_rounds_equal_the_local_kv_rounds(self):
    kv = reflect.reflect(self.local, list(PROMPTS), self.greedy, dataclasses.replace(self.config, continuation="kv"))
    served = reflect.reflect(self.remote, list(PROMPTS), self.greedy, self.config)
    self.assertGreaterEqual(len(served[0][0].rounds), 2, "the marker must have triggered a cue")
    for kv_ts, served_ts in zip(kv, served):
      self.assertEqual([r.text for r in served_ts[0].rounds], [r.text for r in kv_ts[0].rounds])
      self.assertEqual([r.tokens for r in served_ts[0].rounds], [r.tokens for r in kv_ts[0].rounds])
      self.assertEqual(served_ts[0].counted, "exact")
      self.assertEqual(served_ts[0].stop, kv_ts[0].stop)

  def test_served_budget_and_n0(self):
    sampled = base.Sampling(n=2, temperature=0.9, top_p=0.95, max_tokens=10, seed=5)
    plain = self.remote.generate(list(PROMPTS), sampled)
    traces = reflect.reflect(self.remote, list(PROMPTS), sampled, reflect.ReflectConfig(rounds=0))
    for ps, ts in zip(plain, traces):
      self.assertEqual([c.text for c in ps], [t.rounds[0].text for t in ts])
    for budget in (5, 17):
      traces = reflect.reflect(self.remote, list(PROMPTS), sampled,
                               dataclasses.replace(self.config, rounds=3, budget=budget))
      for t in (t for ts in traces for t in ts):
        self.assertLessEqual(t.generated_tokens, budget)


class PlantedBugTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    ts = [t for t in tasks_lib.generate(1, seed=1) if t.template in ("counter", "adder", "edge_detector")]
    cls.problems = [t.problem("detailed") for t in ts]
    cls.prompts = [render_prompt(p, "chat") for p in cls.problems]
    cls.sampling = base.Sampling(max_tokens=400, stop=("endmodule",))

  def test_second_round_fixes_the_planted_bug_through_the_simulator(self):
    backend = planted.planted_backend(self.problems)
    traces = reflect.reflect(backend, self.prompts, self.sampling, reflect.ReflectConfig(rounds=1))
    scores = scaling.reflection_scores(self.problems, traces, 1, workers=2)
    self.assertEqual([s["passed"] for s in scores], [0, len(self.problems)])
    for ts in traces:
      self.assertIn(rules.VERILOG_EVAL_RULES[4], ts[0].rounds[0].cue)  # the tool-free cue carries the rules
      self.assertEqual(ts[0].stop, "closed")

  def test_simulator_feedback_extension_stops_once_it_passes(self):
    backend = planted.planted_backend(self.problems)
    traces = reflect.reflect(backend, self.prompts, self.sampling,
                             reflect.ReflectConfig(rounds=3, feedback="simulator"), problems=self.problems)
    for ts in traces:
      self.assertEqual(ts[0].stop, "passed")
      self.assertEqual(len(ts[0].rounds), 2)
      self.assertIn("The simulator rejects this design (mismatch", ts[0].rounds[0].cue)

  def test_scripted_budget(self):
    backend = planted.planted_backend(self.problems)
    for budget in (10, 45, 80):
      traces = reflect.reflect(backend, self.prompts, self.sampling, reflect.ReflectConfig(rounds=3, budget=budget))
      for t in (t for ts in traces for t in ts):
        self.assertLessEqual(t.generated_tokens, budget)
        self.assertEqual(t.counted, "words")


class TracesTest(absltest.TestCase):

  def test_every_trace_is_verified_by_simulation(self):
    ts = tasks_lib.generate(1, seed=0, templates=("counter", "adder", "edge_detector", "shift_register", "mux"))
    kept, stats = traces_lib.build(ts, workers=2)
    self.assertEqual(stats["kept"], len(kept))
    self.assertGreaterEqual(sum(1 for v in stats["per_bug"].values() if v), 3)  # several bug classes
    probs = {t.problem("detailed").task_id: t.problem("detailed") for t in ts}
    for tr in kept:  # independently of build(): the draft fails, the correction passes
      prob = probs[tr.task_id]
      self.assertNotEqual(harness.simulate_design(prob, tr.draft).category, "pass", tr.bug)
      self.assertEqual(harness.simulate_design(prob, tr.correction).category, "pass", tr.bug)
    with tempfile.TemporaryDirectory() as d:
      path = traces_lib.write_jsonl(os.path.join(d, "traces.jsonl"), kept)
      data = train.instruction_dataset(char_tokenizer(), path, seq_len=1024, batch_size=2, seed=None)
      self.assertLen(data.ids, len(kept))
      with open(path) as f:
        rec = json.loads(f.readline())
      self.assertIn("Wait, let me check", rec["output"])


class JobTest(absltest.TestCase):

  def test_tiny_job_runs_and_resumes(self):
    from configs import scale_rtl as config_lib  # pylint: disable=g-import-not-at-top
    from lacax import runs  # pylint: disable=g-import-not-at-top
    from lacax.jobs import scale_rtl as job  # pylint: disable=g-import-not-at-top

    config = config_lib.get_config("tiny")
    config.benchmark.limit = 3
    config.traces.enabled = False
    job.validate(config)
    with tempfile.TemporaryDirectory() as d:
      rd = runs.RunDir(d)
      out = job.run(config, rd)
      scores = out["rounds"]["scores"]
      self.assertLess(scores[0]["pass@1"], 1.0)
      self.assertEqual(scores[1]["pass@1"], 1.0)
      for b, row in zip(config.reflect.budgets, out["budgets"]):
        self.assertLessEqual(row["max_generated_tokens"], b)
      self.assertTrue(os.path.isfile(os.path.join(d, "scale_rtl.png")))
      again = job.run(config, rd)  # every unit finished: read back, identical
      self.assertEqual(again["rounds"]["scores"], scores)


if __name__ == "__main__":
  absltest.main()
