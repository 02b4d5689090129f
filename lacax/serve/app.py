"""The OpenAI-compatible HTTP API of `lacax serve` (FastAPI): models, completions, chat completions, streaming.

Endpoints:
  GET  /v1/models, /v1/models/{id}   the one served model;
  POST /v1/completions               raw text continued as is (`prompt`: a string, a list of strings, token
                                     ids, or a list of token-id lists); `logprobs` (an integer) returns the
                                     generated tokens' log-probabilities;
  POST /v1/chat/completions          `messages` rendered with the model's chat template; `logprobs: true`;
  GET  /health, /lacax/stats         liveness, and the scheduler's batch counts.

`stream: true` answers with server-sent events: `data: {chunk}` lines (object "text_completion" or
"chat.completion.chunk"), one per decode chunk with new text, a last one with the finish reason (and usage when
`stream_options.include_usage`), then `data: [DONE]`.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON, a missing
or wrongly typed field, a value out of range, or a prompt that does not fit the context length (code
"context_length_exceeded", the message names the length); 404 for an unknown model ("model_not_found") or path;
405 for a wrong method; 500 when generation itself fails.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import fastapi
from fastapi import responses
from starlette.exceptions import HTTPException as StarletteHTTPException

from lacax.hw.backends.base import Completion
from lacax.hw.backends.local import LocalBackend, Row
from lacax.sampling import SamplingConfig
from lacax.serve.engine import Engine, Job

MAX_STOP_STRINGS = 4


class APIError(Exception):
  """An error answered with OpenAI's error body."""

  def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str | None = None) -> APIError:
  return APIError(400, message, param=param, code=code)


# --- request fields ---------------------------------------------------------------------------------------------

def _number(body, name, default, lo, hi):
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _bad(name, f"{name}={value!r} must be a number", "invalid_type")
  if not lo <= value <= hi:
    raise _bad(name, f"{name}={value!r} must be in [{lo}, {hi}]", "invalid_value")
  return float(value)


def _integer(body, name, default, lo, hi=None):
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise _bad(name, f"{name}={value!r} must be an integer", "invalid_type")
  if value < lo or (hi is not None and value > hi):
    raise _bad(name, f"{name}={value!r} must be {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}",
               "invalid_value")
  return value


def _boolean(body, name, default=False):
  value = body.get(name, default)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise _bad(name, f"{name}={value!r} must be a boolean", "invalid_type")
  return value


def _stop(body) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  if isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise _bad("stop", f"stop={stop!r} must be a string or a list of strings", "invalid_type")
  if len(stop) > MAX_STOP_STRINGS:
    raise _bad("stop", f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", "invalid_value")
  return tuple(s for s in stop if s)


def _message_text(content, index: int) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise _bad(f"messages[{index}].content", f"messages[{index}].content must be a string or a list of "
             "{'type': 'text', 'text': ...} parts", "invalid_type")


class Server:
  """The request handling of the API, independent of the web framework (see `create_app`)."""

  def __init__(self, engine: Engine, model_name: str):
    self.engine = engine
    self.backend: LocalBackend = engine.backend
    self.model_name = model_name
    self.created = int(time.time())

  def model_card(self) -> dict[str, Any]:
    return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lacax",
            "context_length": self.backend.context_length}

  def check_model(self, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
      raise _bad("model", "you must provide a model parameter", "missing_required_parameter")
    if not isinstance(model, str):
      raise _bad("model", f"model={model!r} must be a string", "invalid_type")
    if model != self.model_name:
      raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                     param="model", code="model_not_found")

  def _prompt_ids(self, body: dict[str, Any]) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
      raise _bad("prompt", "you must provide a prompt parameter", "missing_required_parameter")
    vocab = self.backend.model.cfg.vocab_size
    is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)  # noqa
                                                          for t in p)
    if isinstance(prompt, str):
      prompts = [self.backend.encode_prompt(prompt)]
    elif is_ids(prompt):
      prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
      prompts = [self.backend.encode_prompt(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
      prompts = [list(p) for p in prompt]
    else:
      raise _bad("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                 "lists (none empty)", "invalid_type")
    for ids in prompts:
      if any(t < 0 or t >= vocab for t in ids):
        raise _bad("prompt", f"prompt token ids must be in [0, {vocab})", "invalid_value")
    return prompts

  def _chat_ids(self, body: dict[str, Any]) -> list[list[int]]:
    messages = body.get("messages")
    if messages is None:
      raise _bad("messages", "you must provide a messages parameter", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
      raise _bad("messages", "messages must be a non-empty list of {'role', 'content'} objects", "invalid_type")
    chat = []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
        raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role' and a 'content'",
                   "invalid_type")
      chat.append({"role": m["role"], "content": _message_text(m["content"], i)})
    if not self.backend.tokenizer.has_chat_template:
      raise _bad("messages", "this model's tokenizer has no chat template; use /v1/completions")
    try:
      return [self.backend.encode_prompt(chat)]
    except Exception as e:  # the template rejected the conversation (e.g. roles out of order)
      raise _bad("messages", f"the chat template rejected the messages: {e}") from e

  def parse(self, body: Any, chat: bool) -> tuple[list[list[int]], dict[str, Any]]:
    """(prompt ids, options) of a request body; raises APIError with the field named."""
    if not isinstance(body, dict):
      raise _bad(None, "the request body must be a JSON object")
    self.check_model(body)
    prompts = self._chat_ids(body) if chat else self._prompt_ids(body)
    if chat:
      max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
      max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
      logprobs = _boolean(body, "logprobs")
      default_max = None
    else:
      max_tokens, max_name = body.get("max_tokens"), "max_tokens"
      logprobs = _integer(body, "logprobs", None, 0, 5) is not None
      default_max = 16  # the completions API's default
      if _boolean(body, "echo"):
        raise _bad("echo", "echo=true is not supported by lacax serve", "unsupported_value")
    n = _integer(body, "n", 1, 1, 128)
    if max_tokens is None:
      longest = max(len(p) for p in prompts)
      max_tokens = default_max or max(1, self.backend.context_length - longest)
    else:
      max_tokens = _integer({max_name: max_tokens}, max_name, None, 1)
    options = dict(
        n=n, max_tokens=max_tokens, logprobs=logprobs, stop=_stop(body),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_integer(body, "seed", 0, -2**63, 2**64 - 1), stream=_boolean(body, "stream"),
        include_usage=False)
    if options["top_p"] <= 0:
      raise _bad("top_p", "top_p=0 must be > 0", "invalid_value")
    stream_options = body.get("stream_options")
    if stream_options is not None:
      if not isinstance(stream_options, dict):
        raise _bad("stream_options", "stream_options must be an object", "invalid_type")
      options["include_usage"] = _boolean(stream_options, "include_usage")
    for ids in prompts:
      try:
        self.backend.check_length(len(ids), max_tokens)
      except ValueError as e:
        raise _bad("messages" if chat else "prompt", str(e), "context_length_exceeded") from e
    return prompts, options

  def job(self, prompts, options, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Job:
    seed = options["seed"] % 2**32
    rows = [Row(ids=tuple(p), max_tokens=options["max_tokens"], seed=(seed + j) % 2**32, stop=options["stop"])
            for p in prompts for j in range(options["n"])]
    sampling = SamplingConfig(temperature=options["temperature"], top_p=options["top_p"])
    put = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)  # noqa: E731
    return Job(rows=rows, sampling=sampling, logprobs=options["logprobs"],
               on_progress=lambda deltas, done: put(("progress", deltas, done)),
               on_finish=lambda result: put(("finish", result)))

  # --- responses ------------------------------------------------------------------------------------------------

  def usage(self, prompts, options, completions: list[Completion]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.tokens or ()) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

  def _token_strings(self, tokens) -> list[str]:
    tok = self.backend.tokenizer
    return [tok.decode([t], skip_special_tokens=False) for t in tokens]

  def logprobs_body(self, completion: Completion, chat: bool):
    if completion.logprobs is None:
      return None
    strings = self._token_strings(completion.tokens)
    if chat:
      return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                          for s, lp in zip(strings, completion.logprobs)]}
    offsets, at = [], 0
    for s in strings:
      offsets.append(at)
      at += len(s)
    return {"tokens": strings, "token_logprobs": list(completion.logprobs), "top_logprobs": None,
            "text_offset": offsets}

  def response(self, rid: str, prompts, options, completions: list[Completion], chat: bool) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(completions):
      choice = {"index": i, "finish_reason": c.finish_reason, "logprobs": self.logprobs_body(c, chat)}
      if chat:
        choice["message"] = {"role": "assistant", "content": c.text}
      else:
        choice["text"] = c.text
      choices.append(choice)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices, "usage": self.usage(prompts, options, completions),
            "system_fingerprint": None}

  def chunk(self, rid: str, chat: bool, index: int, text: str | None, finish: str | None, *, role: bool = False,
            logprobs=None) -> dict[str, Any]:
    if chat:
      delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
      choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
    else:
      choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": [choice]}


def create_app(engine: Engine, model_name: str):
  """The FastAPI application serving `engine` under `model_name`."""
  server = Server(engine, model_name)
  app = fastapi.FastAPI(title="lacax serve", version="1")
  app.state.server = server

  def error_response(e: APIError):
    return responses.JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(APIError)
  async def _api_error(request, exc: APIError):  # pylint: disable=unused-argument
    return error_response(exc)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, exc):  # unknown path (404), wrong method (405)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(APIError(exc.status_code, message, type_=type_, code=str(exc.status_code)))

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/lacax/stats")
  async def stats():
    return {"model": model_name, "backend": server.backend.describe(), **engine.stats.to_json()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [server.model_card()]}

  @app.get("/v1/models/{model_id:path}")
  async def model(model_id: str):
    if model_id != model_name:
      raise APIError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                     param="model", code="model_not_found")
    return server.model_card()

  async def handle(request: fastapi.Request, chat: bool):
    raw = await request.body()
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    prompts, options = server.parse(body, chat)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = server.job(prompts, options, loop, events)
    engine.submit(job)
    prefix = "chatcmpl-" if chat else "cmpl-"
    rid = prefix + uuid.uuid4().hex[:24]
    if not options["stream"]:
      while True:
        event = await events.get()
        if event[0] == "finish":
          break
      result = event[1]
      if isinstance(result, BaseException):
        raise APIError(500, f"generation failed: {result}", type_="server_error")
      return server.response(rid, prompts, options, result, chat)

    async def sse():
      def line(obj):
        return f"data: {json.dumps(obj)}\n\n"

      if chat:
        for i in range(len(job.rows)):
          yield line(server.chunk(rid, True, i, None, None, role=True))
      while True:
        event = await events.get()
        if event[0] == "progress":
          for i, delta in enumerate(event[1]):
            if delta:
              yield line(server.chunk(rid, chat, i, delta, None))
          continue
        result = event[1]
        if isinstance(result, BaseException):
          yield line(APIError(500, f"generation failed: {result}", type_="server_error").body())
          break
        for i, c in enumerate(result):
          yield line(server.chunk(rid, chat, i, None if chat else "", c.finish_reason,
                                  logprobs=server.logprobs_body(c, chat)))
        if options["include_usage"]:
          usage = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": int(time.time()), "model": model_name, "choices": [],
                   "usage": server.usage(prompts, options, result)}
          yield line(usage)
        break
      yield "data: [DONE]\n\n"

    return responses.StreamingResponse(sse(), media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache"})

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    return await handle(request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    return await handle(request, chat=True)

  return app
