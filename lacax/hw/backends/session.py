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

Two things keep a round's cost to what it needs (`experiments/bench_scale_rtl.py` measures them against the
raw-prefix route):
  - the cache is allocated for the round at hand, not for the whole session: the prefill sizes it for the
    prompts and the first round, and a continuation that needs more slots grows it (free slots appended, rounded
    up to `grow_by`, 256, so few shapes compile), up to `capacity`;
  - a continuation decodes only the rows that continue (gathered into a batch padded as the backend pads one,
    then written back), not every row of the session: in reflection most samples stop early.

Only the full cache keeps slot == position, which the rewind relies on: other cache policies are refused.
"""

from __future__ import annotations

import dataclasses
import functools
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
    capacity: cache slots per row (prompt + transcript must stay within it); the most the cache grows to.
    grow_by: the cache's allocation is rounded up to a multiple of this many slots.
  """

  def __init__(self, backend, prompt_ids: Sequence[Sequence[int]], sampling: Sampling, *, capacity: int,
               grow_by: int = 256):
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
    width = backend.batch_width(self.num_rows)
    self.prompts += [self.prompts[0][:1]] * (width - self.num_rows)
    self.seeds += [0] * (width - self.num_rows)
    self.transcripts: list[list[int]] = [[] for _ in self.prompts]
    longest = max(len(p) for p in self.prompts)
    if capacity < longest + 1:
      raise ValueError(f"capacity={capacity} must exceed the longest prompt ({longest} tokens)")
    backend.check_length(longest, capacity - longest)
    self.capacity = int(capacity)
    if not isinstance(grow_by, int) or grow_by < 1:
      raise ValueError(f"grow_by={grow_by!r} must be a positive number of cache slots")
    self.grow_by = grow_by
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
      allocate = self._allocation(max(tokens.shape[1], int(lengths.max()) + loop))
      self.state = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                                      policy=self.backend.policy, decode_capacity=allocate,
                                      return_logprobs=self.logprobs, **statics)
      self.backend.counters["prefill_tokens"] += int(lengths[:self.num_rows].sum())  # real rows only
      rows = np.arange(len(self.prompts))
      self.state, done = self._decode(self.state, limits, tuple(stop), active, loop, statics)
    else:
      ext = {}
      for b in np.flatnonzero(active):
        self.transcripts[b].extend(int(t) for t in append[b])
        if self.held(b) + int(limits[b]) > self.capacity:
          raise ValueError(f"row {b}: {self.held(b)} held tokens + max_tokens {int(limits[b])} exceed the "
                           f"session capacity {self.capacity}")
        ext[b] = (self.prompts[b] + self.transcripts[b])[-len(append[b]) - 1:]
      need = max(self.held(b) for b in ext) + loop
      if need > self.state.cache.capacity:
        self.state = self.state.replace(cache=_grow(self.state.cache, self._allocation(need)))
      rows, go = self._rows_for(np.flatnonzero(active))
      width = _round_up(max(len(e) for e in ext.values()), 16)
      tokens = np.zeros((len(rows), width), np.int32)
      lengths = np.zeros(len(rows), np.int32)
      keep = np.zeros(len(rows), np.int32)
      for i, b in enumerate(rows):
        if go[i]:
          tokens[i, :len(ext[b])] = ext[b]
          lengths[i] = len(ext[b])
          keep[i] = self.held(b) - len(ext[b])
      full = len(rows) == len(self.prompts)
      sub = self.state if full else _take_rows(self.state, jnp.asarray(rows))
      sub = generation.extend(params, sub, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(keep),
                              return_logprobs=self.logprobs, **statics)
      self.backend.counters["extend_tokens"] += int(lengths.sum())
      sub, done = self._decode(sub, limits[rows], tuple(stop), go, loop, statics)
      if full:
        self.state = sub
      else:
        place = np.flatnonzero(go)
        self.state = _put_rows(self.state, sub, jnp.asarray(rows[place]), jnp.asarray(place))
    results: list[Completion | None] = [None] * self.num_rows
    for i, b in enumerate(rows):
      if b < self.num_rows and done[i] is not None:
        results[b] = done[i]
        self.transcripts[b].extend(done[i].tokens)
        self.backend.counters["generated_tokens"] += len(done[i].tokens)
    return results

  def _allocation(self, need: int) -> int:
    """Cache slots to allocate for `need`: rounded up to `grow_by` (few compiled shapes), at most the capacity."""
    return int(min(self.capacity, _round_up(need, self.grow_by)))

  def _rows_for(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the session rows a continuation runs on, which of them continue): the continuing `rows`, padded as the
    backend pads a batch (a power of two, at least min_batch) with copies of the first that do not continue;
    all rows when that is no fewer. Decoding only these keeps a round's cost to the rows that still think."""
    width = self.backend.batch_width(len(rows))
    if width >= len(self.prompts):
      return np.arange(len(self.prompts)), np.isin(np.arange(len(self.prompts)), rows)
    return (np.concatenate([rows, np.full(width - len(rows), rows[0])]).astype(np.int64),
            np.arange(width) < len(rows))

  def _decode(self, state, limits: np.ndarray, stop: tuple[str, ...], active: np.ndarray, loop: int,
              statics) -> tuple[generation.DecodeState, list[Completion | None]]:
    """Decodes the batch `state` (its rows: `limits`, `active`) to the end of the round: the final state and, per
    batch row, the round's `Completion` (None for a row that does not continue)."""
    from lacax.hw.backends.local import RowText  # pylint: disable=g-import-not-at-top

    width = len(limits)
    texts = [RowText(self.tok, stop, self.stop_ids) for _ in range(width)]
    params = self.backend.model.params
    while True:
      out, counts, done, logprobs, step = jax.device_get(
          (state.out, state.num_generated, state.done, state.logprobs, state.step))
      counts = np.minimum(counts, limits)
      rows = [out[i, :counts[i]].tolist() for i in range(width)]
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
    return state, [_completion(texts[i], rows[i], None if logprobs is None else logprobs[i]) if active[i] else None
                   for i in range(width)]


def _completion(text, tokens: list[int], logprobs) -> Completion:
  """A row's round: its text up to a stop (`RowText`), the tokens kept, their log-probabilities."""
  text.update(tokens, True)
  kept = tokens[:text.num_tokens]
  lps = None if logprobs is None else tuple(float(x) for x in logprobs[:len(kept)])
  return Completion(text=text.text, finish_reason=text.finish_reason, tokens=tuple(kept), logprobs=lps)


def _grow(cache, capacity: int):
  """`cache` with free slots appended up to `capacity` (a full cache: slot == position, so nothing moves)."""
  extra = capacity - cache.capacity
  if extra <= 0:
    return cache

  def pad(x, value=0):
    if x is None:
      return None
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)

  if cache.scores is not None or cache.stats is not None or cache.state is not None:
    raise ValueError("a KV session grows only a plain full cache (no scores, statistics or policy state)")
  return cache.replace(k=pad(cache.k), v=pad(cache.v), pos=pad(cache.pos, -1), k_scale=pad(cache.k_scale),
                       v_scale=pad(cache.v_scale))


def _batch_axes(state):
  """Per leaf of a decode state, its batch axis: 1 in the cache ([L, B, ...]), 0 elsewhere, None for the step."""
  axes = {f.name: 0 for f in dataclasses.fields(state) if getattr(state, f.name) is not None}
  axes.update(cache=jax.tree_util.tree_map(lambda _: 1, state.cache), step=None)
  return state.replace(**axes)


@jax.jit
def _take_rows(state, rows):
  """The decode state of batch rows `rows` (in that order)."""
  return jax.tree_util.tree_map(lambda x, a: x if a is None else jnp.take(x, rows, axis=a), state,
                                _batch_axes(state), is_leaf=lambda x: x is None)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_rows(state, sub, rows, place):
  """`state` with its rows `rows` replaced by rows `place` of `sub` (the cache and the PRNG keys a later round
  continues from; the rest of a decode state is rebuilt by `extend`)."""
  def put(x, y, a):
    if a is None:
      return x
    idx = [slice(None)] * x.ndim
    idx[a] = rows
    src = jnp.take(y, place, axis=a)
    return x.at[tuple(idx)].set(src)
  cache = jax.tree_util.tree_map(lambda x, y: put(x, y, 1), state.cache, sub.cache)
  return state.replace(cache=cache, rng=put(state.rng, sub.rng, 0))
