"""Generation in rounds that keep their KV cache: the local backend's continuation for budget forcing.

`LocalBackend.session(prompts, sampling, capacity=...)` gives a `KVSession` of `sampling.n` rows per prompt.
Its first `run` prefills the prompts and decodes (one prefill, one compiled decode loop, host checks of stop
strings every `chunk` steps, as `LocalBackend.generate`); every later `run(append=...)` continues chosen rows
inside the same cache with `lacax.generate.extend`: a row drops the cache entries past its transcript (tokens
decoded after a stop string, pad tokens a finished row kept feeding), then only the appended tokens (a
reflection cue) go through the model, at the positions that follow the transcript. Nothing is prefilled again;
`backend.counters` counts "prefill_tokens" (the prompts, once) apart from "extend_tokens" (each continuation's
last transcript token, fed again after the rewind, plus its appended tokens).

Each row samples with its own key (`sampling.seed + j` for completion j of a prompt, as `generate`), carried
across rounds. The transcript of a row (`transcripts[b]`: every token after its prompt, generated or appended)
is what the cache logically holds; `truncate(b, n)` shortens it (e.g. to suppress an end-of-think marker before
a cue), and the next continuation rewinds the cache to match.

Only the full cache keeps slot == position, which the rewind relies on: other cache policies are refused.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache.full import FullPolicy
from lacax.hw.backends.base import Completion, Sampling


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


class KVSession:
  """Rows that generate in rounds over one KV cache (see the module docstring).

  Attributes:
    prompts: per row, the prompt token ids.
    transcripts: per row, every token after the prompt that the cache logically holds.
    capacity: cache slots per row (prompt + transcript must stay within it).
  """

  def __init__(self, backend, prompt_ids: Sequence[Sequence[int]], sampling: Sampling, *, capacity: int):
    if not isinstance(backend.policy, FullPolicy) or backend.policy.capacity:
      raise ValueError(f"a KV session needs the full cache (slot == position) sized by the run; the backend has "
                       f"policy {backend.policy!r}")
    from lacax.hw.backends.local import sampling_config  # pylint: disable=g-import-not-at-top

    self.backend = backend
    self.tok = backend.tokenizer
    self.prompts = [list(map(int, p)) for p in prompt_ids for _ in range(sampling.n)]
    self.seeds = [sampling.seed + j for _ in prompt_ids for j in range(sampling.n)]
    self.sampling = sampling_config(sampling)
    self.logprobs = bool(sampling.logprobs)
    self.num_rows = len(self.prompts)
    # Batch rows padded as `LocalBackend.run_rows` pads them (a power of two, at least min_batch) with one-token
    # dummy rows that stop after their first token: fewer compilations when the number of rows varies.
    width = self.num_rows
    if backend.pad_batch:
      width = min(1 << (width - 1).bit_length(), max(backend.max_batch, width))
    width = max(width, backend.min_batch)
    self.prompts += [self.prompts[0][:1]] * (width - self.num_rows)
    self.seeds += [0] * (width - self.num_rows)
    self.transcripts: list[list[int]] = [[] for _ in self.prompts]
    longest = max(len(p) for p in self.prompts)
    if capacity < longest + 1:
      raise ValueError(f"capacity={capacity} must exceed the longest prompt ({longest} tokens)")
    backend.check_length(longest, capacity - longest)
    self.capacity = int(capacity)
    self.state = None
    self.stop_ids = tuple(int(i) for i in self.tok.stop_ids)

  def held(self, b: int) -> int:
    """Tokens row b's transcript puts in the cache (prompt + transcript)."""
    return len(self.prompts[b]) + len(self.transcripts[b])

  def truncate(self, b: int, keep: int) -> None:
    """Keeps the first `keep` transcript tokens of row b (the cache follows at its next continuation)."""
    if not 0 <= keep <= len(self.transcripts[b]):
      raise ValueError(f"keep={keep} must be in [0, {len(self.transcripts[b])}] for row {b}")
    del self.transcripts[b][keep:]

  def run(self, max_tokens: Sequence[int], stop: Sequence[str] = (),
          append: Sequence[Sequence[int] | None] | None = None) -> list[Completion | None]:
    """One round. The first call prefills every row; later calls continue the rows whose `append` entry is a
    token list (possibly empty), appending it after their transcript, and leave rows with None alone.

    Args:
      max_tokens: per row, new tokens this round (ignored for rows that do not continue).
      stop: stop strings of this round (the text is cut before one; the tokens keep the one completing it).
      append: per row, tokens to append before generating (None: the row does not continue); must be None on
        the first call.

    Returns:
      per row, the round's `Completion` (None for rows that did not continue); its tokens join the transcript.
    """
    cfg, params = self.backend.model.cfg, self.backend.model.params
    if len(max_tokens) != self.num_rows:
      raise ValueError(f"max_tokens has {len(max_tokens)} entries; expected one per row ({self.num_rows})")
    if self.state is None:
      if append is not None:
        raise ValueError("the first round of a session prefills its prompts: append must be None")
      active = np.ones(self.num_rows, bool)
    else:
      if append is None or len(append) != self.num_rows:
        raise ValueError(f"append must have one entry per row ({self.num_rows}) after the first round")
      active = np.array([a is not None for a in append])
    if any(int(m) < 1 for m, a in zip(max_tokens, active) if a):
      raise ValueError(f"max_tokens={list(max_tokens)} must be >= 1 for every row that generates")
    pad = len(self.prompts) - self.num_rows
    limits = np.array([max(1, int(m)) for m in max_tokens] + [1] * pad, np.int64)
    active = np.concatenate([active, np.full(pad, self.state is None)])
    if append is not None:
      append = list(append) + [None] * pad
    if not active.any():
      return [None] * self.num_rows
    loop = _round_up(int(limits[active].max()), self.backend.token_bucket)
    statics = dict(cfg=cfg, sampling=self.sampling, max_new_tokens=loop, stop_ids=self.stop_ids)
    if self.state is None:
      tokens, lengths = generation.pad_prompts(self.prompts, self.backend.bucket)
      rng = jnp.stack([jax.random.PRNGKey(int(s)) for s in self.seeds])
      self.capacity = max(self.capacity, tokens.shape[1])  # the prefill never shrinks the cache below the batch
      self.state = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                                      policy=self.backend.policy, decode_capacity=self.capacity,
                                      return_logprobs=self.logprobs, **statics)
      self.backend.counters["prefill_tokens"] += int(lengths[:self.num_rows].sum())  # real rows only
    else:
      ext = []
      for b in range(len(self.prompts)):
        if append[b] is None:
          ext.append([])
          continue
        self.transcripts[b].extend(int(t) for t in append[b])
        if self.held(b) + int(limits[b]) > self.capacity:
          raise ValueError(f"row {b}: {self.held(b)} held tokens + max_tokens {int(limits[b])} exceed the "
                           f"session capacity {self.capacity}")
        ext.append((self.prompts[b] + self.transcripts[b])[-len(append[b]) - 1:])
      width = _round_up(max(len(e) for e in ext), 16)
      tokens = np.zeros((len(self.prompts), width), np.int32)
      for b, e in enumerate(ext):
        tokens[b, :len(e)] = e
      lengths = np.array([len(e) for e in ext], np.int32)
      keep = np.array([self.held(b) - len(e) for b, e in enumerate(ext)], np.int32)
      self.state = generation.extend(params, self.state, jnp.asarray(tokens), jnp.asarray(lengths),
                                     jnp.asarray(keep), return_logprobs=self.logprobs, **statics)
      self.backend.counters["extend_tokens"] += int(lengths.sum())
    return self._decode(limits, tuple(stop), active, loop, statics)

  def _decode(self, limits: np.ndarray, stop: tuple[str, ...], active: np.ndarray, loop: int,
              statics) -> list[Completion | None]:
    from lacax.hw.backends.local import RowText  # pylint: disable=g-import-not-at-top

    rows_all = len(self.prompts)
    texts = [RowText(self.tok, stop, self.stop_ids) for _ in range(rows_all)]
    params = self.backend.model.params
    state = self.state
    while True:
      out, counts, done, logprobs, step = jax.device_get(
          (state.out, state.num_generated, state.done, state.logprobs, state.step))
      counts = np.minimum(counts, limits)
      rows = [out[b, :counts[b]].tolist() for b in range(rows_all)]
      host_done = np.asarray(done, bool) | (counts >= limits) | ~active
      if stop:
        host_done |= np.array([t.stopped_by_string(r) if a else False for t, r, a in zip(texts, rows, active)])
      if int(step) >= loop:
        host_done[:] = True
      if host_done.all():
        break
      if (host_done != np.asarray(done, bool)).any():
        state = state.replace(done=jnp.asarray(host_done))
      state = generation.decode(params, state, pad_id=0, until=jnp.int32(int(step) + self.backend.chunk),
                                policy=self.backend.policy, **statics)
    self.state = state
    results: list[Completion | None] = []
    for b in range(self.num_rows):
      if not active[b]:
        results.append(None)
        continue
      texts[b].update(rows[b], True)
      kept = rows[b][:texts[b].num_tokens]
      lps = None if logprobs is None else tuple(float(x) for x in logprobs[b][:len(kept)])
      self.transcripts[b].extend(kept)
      self.backend.counters["generated_tokens"] += len(kept)
      results.append(Completion(text=texts[b].text, finish_reason=texts[b].finish_reason, tokens=tuple(kept),
                                logprobs=lps))
    return results
