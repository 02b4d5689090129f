"""`lacax serve` on 127.0.0.1 with a tiny random model: the `openai` client, streaming, batching of concurrent
requests, OpenAI-style errors, the HTTP backend (parity, retries, timeouts), and the `lacax serve` command."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl.testing import absltest
import httpx
import openai

from lacax.hw.backends import base
from lacax.hw.backends import local
from lacax.hw.backends import openai_http
from lacax.serve import Service
from tests import test_backends

MODEL = "tiny"


def _chat_reference(model, messages, max_new_tokens: int) -> str:
  tok = model.tokenizer
  ids = tok.encode(tok.apply_chat_template(messages), add_bos=False)
  return tok.decode(test_backends.greedy_ids(model, ids, max_new_tokens), skip_special_tokens=True)


class ServeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = test_backends.tiny_model()
    cls.backend = local.LocalBackend(cls.model, chunk=4, bucket=64)
    # A wide gathering window, so that the concurrent requests below land in one batch on a busy machine.
    cls.service = Service(cls.backend, model_name=MODEL, batch_window_s=0.25, max_batch=16).start()
    cls.client = openai.OpenAI(base_url=cls.service.base_url, api_key="unused", max_retries=0, timeout=120)

  @classmethod
  def tearDownClass(cls):
    cls.service.stop()
    super().tearDownClass()

  def _post(self, path: str, content: bytes | str, method: str = "POST") -> httpx.Response:
    return httpx.request(method, self.service.base_url + path, content=content,
                         headers={"Content-Type": "application/json"}, timeout=120)

  def test_models_lists_the_served_model(self):
    models = self.client.models.list().data
    self.assertEqual([m.id for m in models], [MODEL])
    self.assertEqual(self.client.models.retrieve(MODEL).id, MODEL)

  def test_openai_client_gets_the_greedy_text_of_lacax_generate(self):
    got = self.client.completions.create(model=MODEL, prompt=["module adder(", "assign y ="], max_tokens=24,
                                         temperature=0)
    self.assertEqual([c.index for c in got.choices], [0, 1])
    for choice, prompt in zip(got.choices, ["module adder(", "assign y ="]):
      self.assertEqual(choice.text, test_backends.greedy_reference(self.model, prompt, 24))
      self.assertEqual(choice.finish_reason, "length")
    self.assertEqual(got.usage.completion_tokens, 48)
    self.assertEqual(got.usage.prompt_tokens, 2 + len("module adder(") + len("assign y ="))  # BOS each
    messages = [{"role": "system", "content": "You write Verilog."}, {"role": "user", "content": "a mux"}]
    chat = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    self.assertEqual(chat.choices[0].message.content, _chat_reference(self.model, messages, 24))
    self.assertEqual(chat.choices[0].message.role, "assistant")

  def test_streaming_yields_the_same_text(self):
    want = test_backends.greedy_reference(self.model, "wire [7:0] x", 24)
    stream = self.client.completions.create(model=MODEL, prompt="wire [7:0] x", max_tokens=24, temperature=0,
                                            stream=True)
    pieces, finish = [], None
    for chunk in stream:
      pieces.append(chunk.choices[0].text)
      finish = chunk.choices[0].finish_reason or finish
    self.assertEqual("".join(pieces), want)
    self.assertGreater(sum(bool(p) for p in pieces), 2)  # incremental: several chunks of text
    self.assertEqual(finish, "length")
    messages = [{"role": "user", "content": "count"}]
    stream = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    self.assertEqual(text, _chat_reference(self.model, messages, 20))
    self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
    self.assertEqual(chunks[-1].usage.completion_tokens, 20)
    # The wire format: server-sent events ending with [DONE].
    with httpx.stream("POST", self.service.base_url + "/completions", timeout=120,
                      json={"model": MODEL, "prompt": "x", "max_tokens": 5, "stream": True}) as response:
      self.assertEqual(response.headers["content-type"].split(";")[0], "text/event-stream")
      lines = [line for line in response.iter_lines() if line]
    self.assertTrue(all(line.startswith("data: ") for line in lines))
    self.assertEqual(lines[-1], "data: [DONE]")

  def test_stop_strings_and_logprobs_through_the_api(self):
    full = test_backends.greedy_reference(self.model, "reg q;", 30)
    stop = full[8:10]
    got = self.client.completions.create(model=MODEL, prompt="reg q;", max_tokens=30, temperature=0, stop=[stop],
                                         logprobs=1)
    self.assertEqual(got.choices[0].text, full[:full.index(stop)])
    self.assertEqual(got.choices[0].finish_reason, "stop")
    want = self.backend.generate(["reg q;"], base.Sampling(max_tokens=30, stop=(stop,), logprobs=True))[0][0]
    self.assertEqual(got.choices[0].logprobs.token_logprobs, list(want.logprobs))

  def test_seeded_samples_equal_the_local_backend(self):
    got = self.client.completions.create(model=MODEL, prompt="always", max_tokens=12, temperature=0.9, top_p=0.95,
                                         n=3, seed=11)
    want = self.backend.generate(["always"], base.Sampling(n=3, temperature=0.9, top_p=0.95, max_tokens=12,
                                                           seed=11))[0]
    self.assertEqual([c.text for c in got.choices], [c.text for c in want])
    self.assertLen({c.text for c in got.choices}, 3)

  def test_concurrent_requests_all_finish_in_few_batches(self):
    prompts = [f"module m{i}(" for i in range(6)]
    before = self.service.engine.stats.to_json()
    results: dict[int, str] = {}

    async def ask_all():
      client = openai.AsyncOpenAI(base_url=self.service.base_url, api_key="unused", max_retries=0, timeout=120)
      replies = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=p, max_tokens=16,
                                                                 temperature=0) for p in prompts))
      await client.close()
      return replies

    for i, reply in enumerate(asyncio.run(ask_all())):
      results[i] = reply.choices[0].text
    for i, prompt in enumerate(prompts):
      self.assertEqual(results[i], test_backends.greedy_reference(self.model, prompt, 16))
    after = self.service.engine.stats.to_json()
    new_batches = after["batch_requests"][before["batches"]:]
    self.assertEqual(sum(new_batches), 6)
    self.assertLessEqual(len(new_batches), 2)  # batched, not one by one
    self.assertGreaterEqual(max(new_batches), 3)
    stats = httpx.get(self.service.base_url.removesuffix("/v1") + "/lacax/stats").json()
    self.assertEqual(stats["batches"], after["batches"])

  def test_errors_have_openai_bodies_and_status_codes(self):
    def check(response, status, param, code, message):
      self.assertEqual(response.status_code, status, response.text)
      error = response.json()["error"]
      self.assertEqual(set(error), {"message", "type", "param", "code"})
      self.assertEqual((error["param"], error["code"]), (param, code))
      self.assertRegex(error["message"], message)

    check(self._post("/completions", b'{"model": "tiny", "prompt": '), 400, None, "invalid_json", "not valid JSON")
    check(self._post("/completions", json.dumps({"model": "gpt-4", "prompt": "x"})), 404, "model",
          "model_not_found", "'gpt-4' does not exist")
    check(self._post("/chat/completions", json.dumps({"model": "tiny", "messages": [
        {"role": "user", "content": "a" * 300}]})), 400, "messages", "context_length_exceeded",
          "maximum context length is 256 tokens")
    check(self._post("/completions", json.dumps({"model": "tiny", "prompt": "a" * 200, "max_tokens": 100})), 400,
          "prompt", "context_length_exceeded", "maximum context length is 256 tokens; the prompt has 201 tokens")
    check(self._post("/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "ten"})), 400,
          "max_tokens", "invalid_type", "max_tokens='ten' must be an integer")
    check(self._post("/completions", json.dumps({"model": "tiny", "prompt": "x", "temperature": 3})), 400,
          "temperature", "invalid_value", r"in \[0.0, 2.0\]")
    check(self._post("/completions", json.dumps({"model": "tiny"})), 400, "prompt", "missing_required_parameter",
          "prompt")
    check(self._post("/chat/completions", json.dumps({"model": "tiny", "messages": [{"content": "x"}]})), 400,
          "messages[0]", "invalid_type", "role")
    check(self._post("/completions", json.dumps({"model": "tiny", "prompt": "x", "stop": ["a"] * 5})), 400,
          "stop", "invalid_value", "at most 4")
    check(self._post("/nowhere", "{}"), 404, None, "404", "/v1/nowhere")
    check(self._post("/completions", "", method="GET"), 405, None, "405", "GET /v1/completions")
    with self.assertRaises(openai.NotFoundError):
      self.client.completions.create(model="other", prompt="x", max_tokens=2)
    # The server still answers after the errors.
    self.assertEqual(self.client.completions.create(model=MODEL, prompt="x", max_tokens=3).usage.completion_tokens,
                     3)


class HttpBackendAgainstServerTest(absltest.TestCase):
  """`OpenAIHTTPBackend` against a real lacax server; a middleware injects the failures."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = test_backends.tiny_model()
    cls.local = local.LocalBackend(cls.model, chunk=4, bucket=64)
    cls.faults = {"fail": 0, "stall": 0.0, "seen": 0}
    cls.service = Service(cls.local, model_name=MODEL, batch_window_s=0.05)

    @cls.service.app.middleware("http")
    async def inject(request, call_next):
      from fastapi import responses  # pylint: disable=g-import-not-at-top

      cls.faults["seen"] += 1
      if cls.faults["stall"]:
        await asyncio.sleep(cls.faults["stall"])
      if cls.faults["fail"] > 0:
        cls.faults["fail"] -= 1
        return responses.JSONResponse({"error": {"message": "overloaded", "type": "server_error", "param": None,
                                                 "code": None}}, status_code=503)
      return await call_next(request)

    cls.service.start()

  @classmethod
  def tearDownClass(cls):
    cls.service.stop()
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.faults.update(fail=0, stall=0.0, seen=0)

  def test_same_completions_as_the_local_backend(self):
    remote = openai_http.OpenAIHTTPBackend(self.service.base_url, MODEL, timeout=60)
    prompts = ["module x(", [{"role": "user", "content": "hello"}]]
    sampling = base.Sampling(n=2, temperature=1.0, max_tokens=12, seed=3, logprobs=True)
    got, want = remote.generate(prompts, sampling), self.local.generate(prompts, sampling)
    self.assertEqual([[c.text for c in p] for p in got], [[c.text for c in p] for p in want])
    self.assertEqual([[c.finish_reason for c in p] for p in got], [[c.finish_reason for c in p] for p in want])
    self.assertEqual([[c.logprobs for c in p] for p in got], [[c.logprobs for c in p] for p in want])
    self.assertEqual(self.faults["seen"], 2)
    cont = remote.continue_(["module x("], ["input"], base.Sampling(max_tokens=8))
    self.assertEqual(cont[0][0].text, self.local.continue_(["module x("], ["input"], base.Sampling(max_tokens=8))
                     [0][0].text)

  def test_retries_a_failing_server_with_backoff(self):
    self.faults["fail"] = 2
    remote = openai_http.OpenAIHTTPBackend(self.service.base_url, MODEL, retries=3, backoff=0.1, timeout=60)
    start = time.perf_counter()
    got = remote.generate(["assign"], base.Sampling(max_tokens=10))[0][0]
    self.assertGreaterEqual(time.perf_counter() - start, 0.1 + 0.2)  # waited 0.1 s, then 0.2 s
    self.assertEqual(self.faults["seen"], 3)
    self.assertEqual(got.text, test_backends.greedy_reference(self.model, "assign", 10))
    self.faults.update(fail=5, seen=0)
    remote = openai_http.OpenAIHTTPBackend(self.service.base_url, MODEL, retries=1, backoff=0.01, timeout=60)
    with self.assertRaisesRegex(openai_http.BackendHTTPError,
                                r"POST http://127\.0\.0\.1:\d+/v1/completions: HTTP 503: overloaded "
                                r"\(after 2 attempts\)"):
      remote.generate(["assign"], base.Sampling(max_tokens=10))
    self.assertEqual(self.faults["seen"], 2)

  def test_client_errors_are_not_retried(self):
    remote = openai_http.OpenAIHTTPBackend(self.service.base_url, "not-served", retries=3, backoff=0.01)
    with self.assertRaisesRegex(openai_http.BackendHTTPError, r"HTTP 404: the model 'not-served' does not exist"):
      remote.generate(["x"], base.Sampling(max_tokens=2))
    self.assertEqual(self.faults["seen"], 1)

  def test_times_out_cleanly(self):
    self.faults["stall"] = 1.5
    remote = openai_http.OpenAIHTTPBackend(self.service.base_url, MODEL, retries=1, backoff=0.01, timeout=0.3)
    start = time.perf_counter()
    with self.assertRaisesRegex(openai_http.BackendHTTPError,
                                r"127\.0\.0\.1:\d+/v1/completions: timed out after 0.3 s.*after 2 attempts"):
      remote.generate(["x"], base.Sampling(max_tokens=2))
    self.assertLess(time.perf_counter() - start, 1.4)


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


class CommandTest(absltest.TestCase):

  def test_lacax_serve_command_serves_a_checkpoint(self):
    """`lacax serve --model=DIR` (the console script's `lacax.cli.main`) in its own process."""
    from tests import hf_models  # pylint: disable=g-import-not-at-top

    path, _ = hf_models.saved_model("llama_tied")
    tok_dir = tempfile.mkdtemp(prefix="lacax_serve_")
    # hf_models' vocabulary is 113 ids; the character tokenizer's ids are all below that.
    tok = test_backends.char_tokenizer()
    os.makedirs(os.path.join(tok_dir, "model_with_tok"))
    for name in os.listdir(path):
      os.symlink(os.path.join(path, name), os.path.join(tok_dir, "model_with_tok", name))
    target = os.path.join(tok_dir, "model_with_tok")
    tok.backend.save(os.path.join(target, "tokenizer.json"))
    with open(os.path.join(target, "tokenizer_config.json"), "w") as f:
      json.dump({"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True,
                 "chat_template": test_backends.CHATML}, f)
    port = _free_port()
    code = "import sys; from lacax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", f"--model={target}", f"--port={port}",
                             "--model-name=ckpt", "--chunk=4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), text=True)
    self.addCleanup(proc.wait, 30)
    self.addCleanup(proc.terminate)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.3)
      self.assertIsNone(proc.poll(), "".join(output))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    got = client.completions.create(model="ckpt", prompt="module m", max_tokens=12, temperature=0)
    want = local.LocalBackend.load(target).generate(["module m"], base.Sampling(max_tokens=12))[0][0]
    self.assertEqual(got.choices[0].text, want.text)
    self.assertLen(want.tokens, 12)


if __name__ == "__main__":
  absltest.main()
