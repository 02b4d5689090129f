"""An OpenAI-compatible HTTP backend: `lacax serve`, vLLM, llama.cpp's server, TGI, or the OpenAI API itself.

Raw text prompts go to `POST {base_url}/completions` (the text is continued as is, which is what budget forcing
needs: a chat API cannot resume inside the model's own answer); chats go to `POST {base_url}/chat/completions`.
The prompts of one `generate` call are sent concurrently (at most `concurrency` requests in flight), so a
batching server such as `lacax serve` runs them together.

Failures: 429, 5xx, connection errors and timeouts are retried up to `retries` times with exponential backoff
(`backoff * 2**attempt`, capped at `max_backoff`; a 429's `Retry-After` is honoured); other 4xx fail at once.
Every error (`BackendHTTPError`) names the URL, the HTTP status or the transport failure, the server's error
message and how many attempts were made. The API key is read from the environment variable `api_key_env` when
the backend is built, and never appears in `describe()` or an error.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Sequence

import httpx

from lacax.hw.backends.base import Completion, Prompt, Sampling, is_chat

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class BackendHTTPError(RuntimeError):
  """A request to an OpenAI-compatible server failed (the message names the URL, status and attempts)."""

  def __init__(self, message: str, *, url: str, status: int | None = None):
    super().__init__(message)
    self.url, self.status = url, status


def _server_message(response: httpx.Response) -> str:
  try:
    body = response.json()
  except ValueError:
    return response.text[:300]
  if isinstance(body, dict) and isinstance(body.get("error"), dict):
    return str(body["error"].get("message"))
  return str(body)[:300]


class OpenAIHTTPBackend:
  """A client of an OpenAI-compatible server, behind the backend protocol.

  Attributes:
    base_url: the API root, e.g. "http://127.0.0.1:8000/v1".
    model: the model id sent with every request.
    timeout: seconds per request (connect, read, write each).
    retries: extra attempts after a retryable failure.
    backoff, max_backoff: the first retry waits `backoff` seconds, doubling each time up to `max_backoff`.
    concurrency: requests in flight at once.
  """

  # Raw prompts are continued as is on /completions ("raw_prefix"); completions carry token log-probabilities.
  capabilities = frozenset({"raw_prefix", "logprobs"})

  def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
               retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0, concurrency: int = 8):
    if not base_url.startswith(("http://", "https://")):
      raise ValueError(f"base_url={base_url!r} must start with http:// or https://")
    if not model:
      raise ValueError("model='' must name the server's model")
    if timeout <= 0 or retries < 0 or backoff < 0 or concurrency < 1:
      raise ValueError(f"timeout={timeout} must be > 0, retries={retries} >= 0, backoff={backoff} >= 0 and "
                       f"concurrency={concurrency} >= 1")
    self.base_url = base_url.rstrip("/")
    self.model = model
    self.api_key_env = api_key_env
    self._api_key = os.environ.get(api_key_env) if api_key_env else None
    self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
    self.concurrency = concurrency
    self._client = httpx.Client(timeout=httpx.Timeout(timeout), headers=self.headers())

  def headers(self) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    return headers

  def describe(self) -> dict[str, Any]:
    return {"kind": "openai_http", "base_url": self.base_url, "model": self.model,
            "api_key_env": self.api_key_env, "api_key_set": bool(self._api_key)}

  def close(self) -> None:
    self._client.close()

  # --- requests -----------------------------------------------------------------------------------------------

  def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POSTs `body` to base_url + path with retries; returns the JSON reply or raises BackendHTTPError."""
    url = self.base_url + path
    attempts = self.retries + 1
    for attempt in range(attempts):
      wait = min(self.backoff * 2**attempt, self.max_backoff)
      try:
        response = self._client.post(url, json=body)
      except httpx.TimeoutException as e:
        failure, status = f"timed out after {self.timeout:g} s ({type(e).__name__})", None
      except httpx.TransportError as e:
        failure, status = f"connection failed: {type(e).__name__}: {e}", None
      else:
        if response.status_code == 200:
          try:
            return response.json()
          except ValueError as e:
            raise BackendHTTPError(f"POST {url}: HTTP 200 with a body that is not JSON: {response.text[:200]!r}",
                                   url=url, status=200) from e
        status = response.status_code
        failure = f"HTTP {status}: {_server_message(response)}"
        if status not in RETRY_STATUSES:
          raise BackendHTTPError(f"POST {url}: {failure} (not retried)", url=url, status=status)
        retry_after = response.headers.get("Retry-After")
        if status == 429 and retry_after and retry_after.replace(".", "", 1).isdigit():
          wait = min(float(retry_after), self.max_backoff)
      if attempt + 1 < attempts:
        time.sleep(wait)
    raise BackendHTTPError(f"POST {url}: {failure} (after {attempts} attempt{'s' if attempts > 1 else ''})",
                           url=url, status=status)

  def _body(self, sampling: Sampling) -> dict[str, Any]:
    body = {"model": self.model, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "n": sampling.n, "seed": sampling.seed}
    if sampling.stop:
      body["stop"] = list(sampling.stop)
    return body

  def _one(self, prompt: Prompt, sampling: Sampling) -> list[Completion]:
    body = self._body(sampling)
    chat = is_chat(prompt)
    if chat:
      body["messages"] = [dict(m) for m in prompt]
      if sampling.logprobs:
        body["logprobs"] = True
      reply = self.post("/chat/completions", body)
    else:
      body["prompt"] = prompt
      if sampling.logprobs:
        body["logprobs"] = 1
      reply = self.post("/completions", body)
    choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != sampling.n:
      raise BackendHTTPError(f"{self.base_url}: asked for n={sampling.n} choices, got {len(choices)}",
                             url=self.base_url, status=200)
    out = []
    for choice in choices:
      text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
      finish = "length" if choice.get("finish_reason") == "length" else "stop"
      out.append(Completion(text=text or "", finish_reason=finish, tokens=None,
                            logprobs=_logprobs(choice.get("logprobs"), chat) if sampling.logprobs else None))
    return out

  def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[list[Completion]]:
    """One request per prompt (n choices each), sent concurrently; results in prompt order."""
    if len(prompts) <= 1 or self.concurrency == 1:
      return [self._one(p, sampling) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
      return list(pool.map(lambda p: self._one(p, sampling), prompts))

  def continue_(self, prompts: Sequence[str], prefixes: Sequence[str], sampling: Sampling) -> list[list[Completion]]:
    """Continues raw text prompts from inside their answers (prompt + prefix on /completions)."""
    if len(prefixes) != len(prompts):
      raise ValueError(f"prefixes has {len(prefixes)} entries; expected one per prompt ({len(prompts)})")
    for i, (p, x) in enumerate(zip(prompts, prefixes)):
      if not isinstance(p, str) or not isinstance(x, str):
        raise TypeError(f"prompt {i} and its prefix must be raw text: a chat endpoint cannot resume inside the "
                        "model's answer")
    return self.generate([p + x for p, x in zip(prompts, prefixes)], sampling)


def _logprobs(value: Any, chat: bool) -> tuple[float, ...] | None:
  if not value:
    return None
  if chat:
    return tuple(float(t["logprob"]) for t in value.get("content") or ())
  return tuple(float(x) for x in value.get("token_logprobs") or ())
