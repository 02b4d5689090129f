"""Starting `lacax serve`: the command line, and an in-process server on a thread (tests, benchmarks)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import threading
from typing import Sequence

from lacax.hw.backends.local import LocalBackend
from lacax.serve.app import create_app
from lacax.serve.engine import Engine


def _socket(host: str, port: int) -> socket.socket:
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise OSError(f"lacax serve cannot listen on {host}:{port}: {e}") from e
  sock.set_inheritable(True)
  return sock


class Service:
  """A lacax server running in this process on a background thread.

  Usage:
    with Service(backend, model_name="tiny") as service:
      client = openai.OpenAI(base_url=service.base_url, api_key="none")

  Attributes:
    engine: the batching scheduler (its `stats` count batches).
    base_url: "http://127.0.0.1:PORT/v1".
  """

  def __init__(self, backend: LocalBackend, *, model_name: str = "lacax", host: str = "127.0.0.1", port: int = 0,
               batch_window_s: float = 0.01, max_batch: int = 32):
    self.engine = Engine(backend, batch_window_s=batch_window_s, max_batch=max_batch)
    self.model_name = model_name
    self.app = create_app(self.engine, model_name)
    self._sock = _socket(host, port)
    self.host, self.port = self._sock.getsockname()[:2]
    self.base_url = f"http://{host}:{self.port}/v1"
    self._server = None
    self._thread: threading.Thread | None = None

  def start(self) -> "Service":
    import uvicorn  # pylint: disable=g-import-not-at-top

    self.engine.start()
    config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    self._server = uvicorn.Server(config)
    started = threading.Event()

    def run():
      loop = asyncio.new_event_loop()
      asyncio.set_event_loop(loop)
      task = loop.create_task(self._server.serve(sockets=[self._sock]))
      loop.call_soon(started.set)
      loop.run_until_complete(task)
      loop.close()

    self._thread = threading.Thread(target=run, name="lacax-serve-http", daemon=True)
    self._thread.start()
    started.wait(30)
    for _ in range(300):  # until uvicorn accepts connections
      if self._server.started:
        break
      threading.Event().wait(0.01)
    if not self._server.started:
      raise RuntimeError(f"lacax serve did not start on {self.base_url}")
    return self

  def stop(self) -> None:
    if self._server is not None:
      self._server.should_exit = True
    if self._thread is not None:
      self._thread.join(timeout=30)
    self.engine.stop()
    self._sock.close()

  def __enter__(self) -> "Service":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def build_parser(prog: str = "lacax serve") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description="An OpenAI-compatible server over lacax generation.")
  parser.add_argument("--model", default="", help="checkpoint directory or .gguf file (default: the embedded "
                      "SmolLM2-135M-Instruct)")
  parser.add_argument("--model-name", default="", help="the model id clients send (default: the model's name)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--cache-policy", default="full", help="lacax.cache.registry policy: full, streaming, "
                      "lacache, h2o, tova, snapkv, pyramidkv, kvmerger")
  parser.add_argument("--cache-size", type=int, default=0, help="KV budget in tokens (every policy but full)")
  parser.add_argument("--cache-start-size", type=int, default=4, help="attention sinks (streaming, lacache)")
  parser.add_argument("--context-length", type=int, default=0, help="prompt + max_tokens limit (default: the "
                      "model's max_position_embeddings)")
  parser.add_argument("--max-batch", type=int, default=32, help="rows per batch")
  parser.add_argument("--batch-window-ms", type=float, default=10.0, help="how long the scheduler gathers "
                      "requests after the first one of a batch")
  parser.add_argument("--chunk", type=int, default=8, help="decode steps between host checks (stop strings, "
                      "streaming granularity)")
  parser.add_argument("--no-warmup", action="store_true", help="skip compiling a first request at start-up")
  return parser


def backend_from_args(args: argparse.Namespace) -> LocalBackend:
  cache = {"size": args.cache_size or None, "start_size": args.cache_start_size}
  return LocalBackend.load(args.model or None, dtype=args.dtype, cache_policy=args.cache_policy, cache=cache,
                           chunk=args.chunk, max_batch=args.max_batch, context_length=args.context_length or None)


def serve(args: argparse.Namespace) -> None:
  """Loads the model and serves it until interrupted."""
  import uvicorn  # pylint: disable=g-import-not-at-top

  backend = backend_from_args(args)
  name = args.model_name or backend.model.cfg.name
  if not args.no_warmup:
    from lacax.hw.backends.base import Sampling  # pylint: disable=g-import-not-at-top

    backend.generate(["Hello"], Sampling(max_tokens=2))
  engine = Engine(backend, batch_window_s=args.batch_window_ms / 1000.0, max_batch=args.max_batch).start()
  sock = _socket(args.host, args.port)
  print(f"lacax serve: {name} ({backend.describe()['source']}, policy {backend.policy!r}) on "
        f"http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
  try:
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name), log_level="info"))
    server.run(sockets=[sock])
  finally:
    engine.stop()
    sock.close()


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO)
  serve(build_parser().parse_args(argv))
  return 0
