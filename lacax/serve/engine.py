"""The batching scheduler behind `lacax serve`: one thread that gathers requests and runs them as one batch.

Policy (static batching with a short gathering window):

  1. The scheduler thread blocks until a request arrives, then keeps gathering for `batch_window_s` (counted
     from that first request) or until `max_batch` rows are waiting (a request with n choices is n rows).
  2. Rows of one batch share one sampling configuration (temperature, top-p: they are static in the compiled
     decode loop). The batch takes the oldest waiting request and every other waiting request with the same
     configuration, oldest first, up to `max_batch` rows; the others wait for the next batch, in order.
  3. The batch is one `LocalBackend.run_rows` call: one prefill and one compiled decode loop over every row, each
     row with its own max_tokens, seed and stop strings; the loop returns to the host every `chunk` steps, and
     each request's new text is handed to it then (streaming).
  4. A request that arrives while a batch runs waits for the next one (no joining a running batch).

Every row samples with its own key (seed + choice index), so a request's output does not depend on the requests
it was batched with (greedy output is the same as `lacax.generate` on the request alone).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

from lacax.hw.backends.base import Completion
from lacax.hw.backends.local import LocalBackend, Row
from lacax.sampling import SamplingConfig


@dataclasses.dataclass
class Job:
  """One request: its rows, their shared sampling, and where its progress goes.

  Attributes:
    rows: the rows (prompt x choice) of the request.
    sampling: temperature / top-p of every row.
    logprobs: whether the request wants token log-probabilities.
    on_progress: called on the scheduler thread with (per-row new text, per-row done) after every chunk.
    on_finish: called on the scheduler thread with the completions, or with an exception.
  """

  rows: list[Row]
  sampling: SamplingConfig
  logprobs: bool
  on_progress: Callable[[list[str], list[bool]], None]
  on_finish: Callable[[list[Completion] | BaseException], None]
  arrival: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class EngineStats:
  """What the scheduler has done: one entry per batch (its requests and rows)."""

  batch_requests: list[int] = dataclasses.field(default_factory=list)
  batch_rows: list[int] = dataclasses.field(default_factory=list)
  generated_tokens: int = 0

  def to_json(self) -> dict[str, Any]:
    return {"batches": len(self.batch_rows), "batch_requests": list(self.batch_requests),
            "batch_rows": list(self.batch_rows), "requests": sum(self.batch_requests),
            "generated_tokens": self.generated_tokens}


class Engine:
  """Runs submitted jobs on a `LocalBackend`, batched by the policy of the module docstring."""

  def __init__(self, backend: LocalBackend, *, batch_window_s: float = 0.01, max_batch: int = 32):
    if batch_window_s < 0:
      raise ValueError(f"batch_window_s={batch_window_s!r} must be >= 0")
    if not isinstance(max_batch, int) or max_batch < 1:
      raise ValueError(f"max_batch={max_batch!r} must be an integer >= 1")
    self.backend = backend
    self.batch_window_s = float(batch_window_s)
    self.max_batch = max_batch
    self.stats = EngineStats()
    self._queue: queue.Queue[Job | None] = queue.Queue()
    self._waiting: collections.deque[Job] = collections.deque()
    self._thread: threading.Thread | None = None
    self._stopping = threading.Event()

  def start(self) -> "Engine":
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="lacax-serve-scheduler", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    self._stopping.set()
    self._queue.put(None)
    if self._thread is not None:
      self._thread.join(timeout=60)
      self._thread = None

  def submit(self, job: Job) -> None:
    if self._stopping.is_set():
      raise RuntimeError("the engine is stopped")
    self._queue.put(job)

  # --- scheduler thread ---------------------------------------------------------------------------------------

  def _gather(self) -> list[Job]:
    """Waits for work, gathers for the window, and returns the next batch's jobs (empty when stopping)."""
    if not self._waiting:
      job = self._queue.get()
      if job is None:
        return []
      self._waiting.append(job)
    deadline = self._waiting[0].arrival + self.batch_window_s
    while sum(len(j.rows) for j in self._waiting) < self.max_batch:
      left = deadline - time.monotonic()
      try:
        job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if job is None:
        self._stopping.set()
        break
      self._waiting.append(job)
    first = self._waiting[0]
    batch, rows, keep = [], 0, collections.deque()
    for job in self._waiting:
      if job.sampling == first.sampling and (not batch or rows + len(job.rows) <= self.max_batch):
        batch.append(job)
        rows += len(job.rows)
      else:
        keep.append(job)
    self._waiting = keep
    return batch

  def _loop(self) -> None:
    while True:
      jobs = self._gather()
      if not jobs:
        if self._stopping.is_set():
          for job in self._waiting:
            job.on_finish(RuntimeError("the server is shutting down"))
          return
        continue
      self._run(jobs)

  def _run(self, jobs: list[Job]) -> None:
    rows = [row for job in jobs for row in job.rows]
    bounds, start = [], 0
    for job in jobs:
      bounds.append((start, start + len(job.rows)))
      start += len(job.rows)

    def on_chunk(deltas, done):
      for job, (lo, hi) in zip(jobs, bounds):
        if any(deltas[lo:hi]) or any(done[lo:hi]):
          try:
            job.on_progress(list(deltas[lo:hi]), [bool(d) for d in done[lo:hi]])
          except Exception:  # pylint: disable=broad-except
            logging.exception("lacax serve: a request's progress callback failed")

    self.stats.batch_requests.append(len(jobs))
    self.stats.batch_rows.append(len(rows))
    try:
      completions = self.backend.run_rows(rows, jobs[0].sampling, logprobs=any(j.logprobs for j in jobs),
                                          on_chunk=on_chunk)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("lacax serve: a batch of %d rows failed", len(rows))
      for job in jobs:
        job.on_finish(e)
      return
    self.stats.generated_tokens += sum(len(c.tokens or ()) for c in completions)
    for job, (lo, hi) in zip(jobs, bounds):
      got = completions[lo:hi]
      if not job.logprobs:
        got = [dataclasses.replace(c, logprobs=None) for c in got]
      job.on_finish(got)
