"""LaCache (arXiv 2507.14204): the ladder index planner, reproducing GATECH-EIC/LaCache@0f27c33 exactly, and
`LadderPolicy`, the cache policy that applies it.

LaCache keeps, in every layer, the same number of KV slots but a different subset of the old tokens: token
groups of width B are "laddered" so that each layer keeps A consecutive tokens of each group at a layer-dependent
offset (its *phase*). Deeper and shallower layers therefore remember different tokens, and across the layers a
long stretch of history stays covered. The planner (`ladder_plan`) only decides *which slots to keep*;
`LadderPolicy` applies its plan to the cache with the shared gather (`lacax.cache.plans.apply_plan`).

Notation (the reference's `*/lacache/kv_cache.py`, class `LaCache`):

  N = num_layers, S = span, O = overlap, C = cache_size, s = start_size (sinks), L = cached length (the same in
  every layer), c = ladder cursor (persistent, starts at s).
  B = 1 + ceil((N - S) / (S - O))   ladder steps = width in tokens of one ladder group
  A = min(ceil(S / (S - O)), B)      tokens of each group a layer keeps
  R = B - A                          tokens removed per group per layer

One compaction call (run after every append, or once after a prefill):

  1. L <= C: no-op.
  2. First compaction only: C += floor(R / 2). Compaction removes tokens in quanta of R, so the length after it
     oscillates in (C - R, C]; the reference shifts C up by half a quantum so the *average* length is about the
     nominal C ("compensation_for_match_average_size"). `LadderState.cache_size` is the compensated value.
  3. need = L - C; room = C - c - N; capacity = floor(room / A) * R. The last N slots are a reserve: the cursor
     never passes C - N, so in streaming the newest N - R + 1 tokens (all N when R = 1; the length can dip R - 1
     below C) always sit uncompacted at the end. A multi-pass startover (below) does not keep that promise.
  4. Normal case (need <= capacity): g = ceil(need / R) groups starting at the cursor are compacted. Layer i keeps
     slots [0, c), then c + phase_i + B*j + k for j < g, k < A, then [c + B*g, L); the cursor moves to c + g*A.
  5. Startover case (need > capacity), the "iterative compaction": first compact everything compactable
     (step 4 with g = floor(room / A)), then re-ladder the *result* from the sinks on: with
     K1 = floor((C - s - N) / A) * R (what one full pass removes), r = need - capacity, T = ceil(r / K1) passes,
     B_T = B + (T - 1)(B - 1), R_T = B_T - A and g_T = ceil(r / R_T), layer i keeps entries [0, s), then
     s + phase_i(R_T) + B_T*j + T*k for j < g_T, k < A, then [s + B_T*g_T, end). The cursor becomes s + g_T*A.
     The already-compacted region is thinned again, so older tokens get sparser with every round.

Reference quirks this module reproduces on purpose (they are what the published numbers ran with):

  * **Modular layer phase.** Layer i uses phase i mod (R + 1) (and i mod (R_T + 1) in the re-ladder), so with
    N=32, S=16, O=0 even layers keep the older token of every pair and odd layers the newer one. The paper draws
    contiguous layer blocks instead ("the first S layers keep the oldest tokens, ..."). The code's modular
    mapping is the default (`layer_mapping="modular"`); `layer_mapping="contiguous"` is the paper-style option,
    defined in `_layer_phase`.
  * **Token s is an extra sink for phase-0 layers.** A phase-0 layer keeps ladder slot s + 0 in every pass, so in
    streaming it never drops the first non-sink token (token 4 with the ppl defaults).
  * **Duplicate slots after a multi-pass startover.** When T > 1 and A > 1 the re-ladder's within-group stride T
    can reach past its group: for the last group this lands on the first tail slot, which the layer then holds
    twice (e.g. LongBench budget 0.25, S=9, O=3: layers 7, 15, 23, 31 hold one token twice). Streaming (one token
    per call) always has T = 1 and never does this.
  * **Out-of-range re-ladder.** For a jump of many tokens at once (T >= 2) with a tight budget the reference's
    re-ladder can index past the cache and raises IndexError. `check_compaction` detects this on the host and
    `LadderConfig.for_prefill` rejects such prompts; `ladder_plan` (traced) cannot raise, and its result is then
    unspecified (indices may point past the valid length).

Shapes: `src_index: [num_layers, out_capacity]` int32, every other planner value is an int32/bool scalar.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache import plans
from lacax.cache.base import CachePolicy
from lacax.cache.kv_cache import KVCache
from lacax.model.config import ModelConfig

LAYER_MAPPINGS = ("modular", "contiguous")
PREFILL_PROTOCOLS = ("longbench", "niah")

# LongBench/pred.py caps the sinks at 128 tokens; niah/pred.py reserves 64 "for questions/system instructions".
_LONGBENCH_MAX_START = 128
_NIAH_START = 64


def _ceil_div(a, b):
  """ceil(a / b) for ints (Python or jnp; exact for negative `a`, as Python's math.ceil(a / b) is)."""
  return -((-a) // b)


@dataclasses.dataclass(frozen=True)
class LadderConfig:
  """Static shape of a LaCache ladder. Frozen and hashable, so it can be a static `jax.jit` argument.

  Attributes:
    num_layers: N, decoder layers (every layer holds the same number of slots).
    span: S, the number of layers that keep one ladder step; S < N.
    overlap: O, layers shared by consecutive ladder steps; 0 <= O < S.
    cache_size: C, the nominal KV budget in tokens per layer (before the first-compaction compensation).
    start_size: s, attention sinks [0, s) that are never compacted (4 in the reference's ppl driver).
    layer_mapping: "modular" (the reference code, default) or "contiguous" (the paper's layer blocks); see
      `_layer_phase`.
  """

  num_layers: int
  span: int
  overlap: int
  cache_size: int
  start_size: int = 4
  layer_mapping: str = "modular"

  def __post_init__(self):
    for name in ("num_layers", "span", "overlap", "cache_size", "start_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"LadderConfig.{name}={value!r} must be an integer")
      object.__setattr__(self, name, int(value))
    for name in ("num_layers", "span", "cache_size", "start_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LadderConfig.{name}={getattr(self, name)} must be positive")
    if self.overlap < 0:
      raise ValueError(f"LadderConfig.overlap={self.overlap} must be >= 0")
    if self.overlap >= self.span:
      raise ValueError(f"LadderConfig.overlap={self.overlap} must be < span={self.span} (the ladder advances by "
                       "span - overlap layers per step; the reference divides by span - overlap)")
    if self.span >= self.num_layers:
      raise ValueError(f"LadderConfig.span={self.span} must be < num_layers={self.num_layers} (span >= layers "
                       "leaves nothing to remove per group; the reference divides by zero)")
    if self.R < 1:
      raise ValueError(
          f"LadderConfig.overlap={self.overlap} with span={self.span}, num_layers={self.num_layers} gives "
          f"R = B - A = {self.B} - {self.A} = 0 tokens removed per ladder group; it must be >= 1 (the reference "
          "divides by R). Use a smaller overlap or span")
    if self.layer_mapping not in LAYER_MAPPINGS:
      raise ValueError(f"LadderConfig.layer_mapping={self.layer_mapping!r} must be one of {list(LAYER_MAPPINGS)}")
    # One pass must be able to remove something (K1 > 0 in the module docstring), otherwise the reference divides
    # by zero at its first startover. The arithmetic runs on the compensated size, hence the `compensation` term.
    min_cache = self.start_size + self.num_layers + self.A - self.compensation
    if self.cache_size < min_cache:
      raise ValueError(
          f"LadderConfig.cache_size={self.cache_size} must be >= {min_cache} = start_size {self.start_size} + "
          f"num_layers {self.num_layers} (uncompacted reserve) + A {self.A} (one ladder group) - floor(R/2) "
          f"{self.compensation} (first-compaction compensation)")

  @property
  def B(self) -> int:
    """Width in tokens of one ladder group (= number of ladder steps): 1 + ceil((N - S) / (S - O))."""
    return 1 + _ceil_div(self.num_layers - self.span, self.span - self.overlap)

  @property
  def A(self) -> int:
    """Tokens of each group one layer keeps: min(ceil(S / (S - O)), B)."""
    return min(_ceil_div(self.span, self.span - self.overlap), self.B)

  @property
  def R(self) -> int:
    """Tokens of each group one layer drops: B - A."""
    return self.B - self.A

  @property
  def compensation(self) -> int:
    """floor(R / 2), added to the cache size at the first compaction (see the module docstring)."""
    return self.R // 2

  @property
  def stream_capacity(self) -> int:
    """Slots a token-by-token stream needs: the longest a layer gets right after an append, C + floor(R/2) + 1."""
    return self.cache_size + self.compensation + 1

  @classmethod
  def for_prefill(cls, num_layers: int, span: int, overlap: int, budget: float, prompt_len: int,
                  model_max_len: int | None = None, protocol: str = "longbench",
                  layer_mapping: str = "modular") -> "LadderConfig":
    """The one-shot (prefill, one compaction, then decode) setup of the reference drivers.

    - "longbench" (`LongBench/pred.py::greedy_generate`): cache_size = int(budget * model_max_len) with
      `model_max_len` from `config/model2maxlen.json` (3500 for Llama-2-7b/13b-chat, 7500 for SmolLM2-1.7B) -- not
      the prompt length; start_size = min(128, max(1, P - (N + 1)), cache_size - (N + 1)), P = prefilled length.
    - "niah" (`niah/pred.py`): cache_size = int(budget * prompt_len), start_size = 64.

    Raises:
      ValueError: naming the argument or field, for an invalid budget/protocol, a config the ladder cannot run,
        or a prompt whose one-shot compaction the reference cannot index (see `check_compaction`).
    """
    if protocol not in PREFILL_PROTOCOLS:
      raise ValueError(f"for_prefill protocol={protocol!r} must be one of {list(PREFILL_PROTOCOLS)}")
    if not budget > 0:
      raise ValueError(f"for_prefill budget={budget!r} must be > 0")
    if prompt_len <= 0:
      raise ValueError(f"for_prefill prompt_len={prompt_len} must be positive")
    if protocol == "longbench":
      if model_max_len is None or model_max_len <= 0:
        raise ValueError(f"for_prefill model_max_len={model_max_len!r} must be a positive int for protocol "
                         "'longbench' (the budget is a fraction of the model's max length, not of the prompt)")
      cache_size = int(budget * model_max_len)
      start_size = min(_LONGBENCH_MAX_START, max(1, prompt_len - (num_layers + 1)), cache_size - (num_layers + 1))
    else:
      cache_size = int(budget * prompt_len)
      start_size = _NIAH_START
    cfg = cls(num_layers=num_layers, span=span, overlap=overlap, cache_size=cache_size, start_size=start_size,
              layer_mapping=layer_mapping)
    try:
      check_compaction(cfg, init_ladder_state(cfg), prompt_len)
    except ValueError as e:
      raise ValueError(f"for_prefill prompt_len={prompt_len} is too long for budget={budget}: {e}") from None
    return cfg


@flax.struct.dataclass
class LadderState:
  """The planner's persistent state, a pytree carried through `lax.scan` / `lax.while_loop`.

  Attributes:
    cursor: int32 [], the ladder cursor c: slots [s, c) are laddered, [c, L) are not compacted yet.
    compacted: bool [], whether the first compaction (and so the size compensation) has happened.
    cache_size: int32 [], the cache size the no-op test and the arithmetic use: C, then C + floor(R/2).
  """

  cursor: jax.Array
  compacted: jax.Array
  cache_size: jax.Array


def init_ladder_state(cfg: LadderConfig) -> LadderState:
  """The state of a fresh cache: cursor at the sinks' end, no compaction yet."""
  return LadderState(cursor=jnp.asarray(cfg.start_size, jnp.int32), compacted=jnp.asarray(False),
                     cache_size=jnp.asarray(cfg.cache_size, jnp.int32))


def _layer_phase(layer, modulus, num_layers: int, mapping: str):
  """Ladder offset of `layer` when the phases are 0..modulus-1 (modulus = R + 1, or R_T + 1 in a re-ladder).

  "modular" (reference): layer mod modulus.
  "contiguous" (paper-style blocks): the same multiset of phases as "modular", handed out in layer order, i.e. the
  modular phases stably sorted by layer: with q, b = divmod(N, modulus), phases 0..b-1 get q+1 consecutive
  layers each and the others q. Shallow layers keep the oldest offsets of each group. Because it is a layer
  permutation of the reference's assignment, every token is held by the same number of layers as in the
  reference (for streaming, where the modulus is always R + 1, the kept sets are exactly the reference's with the
  layers permuted). For O = 0 and S | N this is layer // S, the paper's blocks of S layers.

  Python ints (the list reference) take the definition literally; jnp arrays (the planner, where the re-ladder's
  modulus is traced) use the closed form, and the tests check that the two agree.
  """
  if mapping == "modular":
    return layer % modulus
  if isinstance(layer, int) and isinstance(modulus, int):
    return sorted(j % modulus for j in range(num_layers))[layer]
  per_phase, bigger = num_layers // modulus, num_layers % modulus
  split = bigger * (per_phase + 1)
  # per_phase == 0 only when every layer falls in the first branch; the max keeps the unused branch finite.
  return jnp.where(layer < split, layer // (per_phase + 1), bigger + (layer - split) // jnp.maximum(per_phase, 1))


# ----------------------------------------------------------------------------------------------------------------
# Host-side literal reference (an oracle for tests; Python lists, one step of the reference at a time).
# ----------------------------------------------------------------------------------------------------------------


def _ladder_list(length: int, base: int, groups: int, phase: int, width: int, stride: int, keep: int) -> list[int]:
  """[0, base) + the laddered slots + [base + width*groups, length); IndexError past `length`, as torch does."""
  laddered = [base + phase + width * j + stride * k for j in range(groups) for k in range(keep)]
  index = list(range(base)) + laddered + list(range(base + width * groups, length))
  if index and max(index) >= length:
    raise IndexError(f"ladder slot {max(index)} is past the cache length {length} (the reference fails here)")
  return index


class _CallScalars(NamedTuple):
  """The integers one compaction call of the reference computes (host side; module docstring notation)."""

  cache_size: int  # C, compensated
  startover: bool
  groups: int  # g of the first (cursor) pass
  passes: int  # T; the re-ladder fields are only meaningful when `startover`
  width_t: int  # B_T
  groups_t: int  # g_T


def _call_scalars(cfg: LadderConfig, state: Mapping[str, Any], length: int) -> _CallScalars | None:
  """None for a no-op call (length <= cache size), else the call's integers."""
  cursor, cache_size = int(state["cursor"]), int(state["cache_size"])
  if length <= cache_size:
    return None
  if not state["compacted"]:
    cache_size += cfg.compensation
  n, A, R = cfg.num_layers, cfg.A, cfg.R
  need = length - cache_size
  room = cache_size - cursor - n
  capacity = room // A * R
  if need <= capacity:
    return _CallScalars(cache_size, False, _ceil_div(need, R), 1, cfg.B, 0)
  remaining = need - capacity
  passes = _ceil_div(remaining, (cache_size - cfg.start_size - n) // A * R)
  width_t = cfg.B + (passes - 1) * (cfg.B - 1)
  return _CallScalars(cache_size, True, room // A, passes, width_t, _ceil_div(remaining, width_t - A))


def reference_plan(cfg: LadderConfig, state: Mapping[str, Any], length: int) -> tuple[list[list[int]], dict]:
  """The reference's compaction call, literally, on Python lists (slow; a test oracle).

  Args:
    cfg: the ladder.
    state: {"cursor": int, "compacted": bool, "cache_size": int} (a `LadderState` as plain Python values).
    length: L, the current cached length of every layer.

  Returns:
    (plan, new_state): plan[i] lists, for layer i, the current slots to keep, in order; new_state as `state`.

  Raises:
    IndexError: where the reference's gather would (a multi-pass startover that runs past the cache).
  """
  n, s, A, R = cfg.num_layers, cfg.start_size, cfg.A, cfg.R
  cursor = int(state["cursor"])
  call = _call_scalars(cfg, state, length)
  if call is None:
    unchanged = dict(cursor=cursor, compacted=bool(state["compacted"]), cache_size=int(state["cache_size"]))
    return [list(range(length)) for _ in range(n)], unchanged
  plan = []
  for i in range(n):
    keep = _ladder_list(length, cursor, call.groups, _layer_phase(i, R + 1, n, cfg.layer_mapping), cfg.B, 1, A)
    if call.startover:
      phase_t = _layer_phase(i, call.width_t - A + 1, n, cfg.layer_mapping)
      keep = [keep[j] for j in _ladder_list(len(keep), s, call.groups_t, phase_t, call.width_t, call.passes, A)]
    plan.append(keep)
  new_cursor = s + call.groups_t * A if call.startover else cursor + call.groups * A
  return plan, dict(cursor=new_cursor, compacted=True, cache_size=call.cache_size)


def check_compaction(cfg: LadderConfig, state: LadderState | Mapping[str, Any], length: int) -> None:
  """Raises ValueError if compacting `length` cached tokens from `state` would index past the cache.

  That happens only for a multi-pass startover (T >= 2: a jump of many tokens at once, e.g. a long prompt against
  a small budget), where the reference raises IndexError; streaming one token per call never triggers it.
  """
  if isinstance(state, LadderState):
    state = {k: np.asarray(v).item() for k, v in dataclasses.asdict(state).items()}
  call = _call_scalars(cfg, state, length)
  if call is None or not call.startover:
    return
  n, A = cfg.num_layers, cfg.A
  mid_length = length - call.groups * cfg.R
  # The last laddered slot of the re-ladder; the largest phase is min(R_T, N - 1) under both mappings.
  top = cfg.start_size + min(call.width_t - A, n - 1) + call.width_t * (call.groups_t - 1) + call.passes * (A - 1)
  if top >= mid_length:
    raise ValueError(
        f"compacting length={length} with {cfg} needs {call.passes} startover passes and indexes slot {top} of "
        f"{mid_length}: the reference raises IndexError here. Use a larger cache_size or a shorter prompt")


# ----------------------------------------------------------------------------------------------------------------
# The jit-compatible planner.
# ----------------------------------------------------------------------------------------------------------------


def _ladder_source(slot, base, groups, phase, width, stride, keep: int):
  """Closed form of `_ladder_list`: for output slot m, the input slot it comes from.

  m < base -> m; base <= m < base + groups*keep -> base + phase + width*((m-base)//keep) + stride*((m-base)%keep);
  after that -> base + width*groups + (m - base - groups*keep). All arguments broadcast; `keep` is static.
  """
  rel = slot - base
  laddered = base + phase + width * (rel // keep) + stride * (rel % keep)
  tail = base + width * groups + (rel - groups * keep)
  return jnp.where(rel < 0, slot, jnp.where(rel < groups * keep, laddered, tail))


@functools.partial(jax.jit, static_argnames=("cfg", "out_capacity"))
def ladder_plan(cfg: LadderConfig, state: LadderState, length: jax.Array,
                out_capacity: int) -> tuple[jax.Array, jax.Array, LadderState]:
  """One compaction call of the reference, as a gather plan with static shapes (usable under jit/scan/while).

  The startover case is the composition of two ladder maps (compact the rest of the ladder, then re-ladder the
  result from the sinks); the cases are selected with `jnp.where`, never Python control flow on traced values.

  Args:
    cfg: static ladder config.
    state: the planner state before the call.
    length: int32 [], L, the cached length (the same in every layer) after the latest append.
    out_capacity: static number of output slots (the cache capacity; >= the new length).

  Returns:
    src_index: int32 [num_layers, out_capacity]; for slot m < new_length of layer i, the current slot whose K/V
      goes there; -1 for m >= new_length. When L <= the cache size it is the identity (a no-op).
    new_length: int32 [], the length of every layer after the call.
    new_state: the planner state after the call.
  """
  n, s, A, R = cfg.num_layers, cfg.start_size, cfg.A, cfg.R
  length = jnp.asarray(length, jnp.int32)
  compacting = length > state.cache_size
  cache_size = jnp.where(state.compacted, state.cache_size, state.cache_size + cfg.compensation)
  need = length - cache_size
  room = cache_size - state.cursor - n
  capacity = room // A * R
  startover = need > capacity
  groups = jnp.where(startover, room // A, _ceil_div(need, R))
  mid_length = length - groups * R

  # Re-ladder constants; only used when `startover`, kept finite otherwise. One pass removes >= R > 0 tokens
  # because the config validated cache_size + floor(R/2) - s - N >= A.
  remaining = jnp.maximum(need - capacity, 1)
  passes = _ceil_div(remaining, (cache_size - s - n) // A * R)
  width_t = cfg.B + (passes - 1) * (cfg.B - 1)
  groups_t = _ceil_div(remaining, width_t - A)

  layer = jnp.arange(n, dtype=jnp.int32)[:, None]  # [N, 1]
  slot = jnp.arange(out_capacity, dtype=jnp.int32)[None, :]  # [1, out_capacity]
  relaid = _ladder_source(slot, s, groups_t, _layer_phase(layer, width_t - A + 1, n, cfg.layer_mapping), width_t,
                          passes, A)  # [N, out_capacity], a slot of the once-compacted cache
  mid_slot = jnp.where(startover, relaid, slot)
  src = _ladder_source(mid_slot, state.cursor, groups, _layer_phase(layer, R + 1, n, cfg.layer_mapping), cfg.B, 1,
                       A)  # [N, out_capacity], a slot of the current cache
  new_length = jnp.where(compacting, jnp.where(startover, mid_length - groups_t * (width_t - A), mid_length), length)
  src = jnp.where(compacting, src, slot)
  src_index = jnp.where(slot < new_length, src, -1).astype(jnp.int32)

  new_cursor = jnp.where(startover, s + groups_t * A, state.cursor + groups * A)
  new_state = LadderState(
      cursor=jnp.where(compacting, new_cursor, state.cursor).astype(jnp.int32),
      compacted=state.compacted | compacting,
      cache_size=jnp.where(compacting, cache_size, state.cache_size).astype(jnp.int32))
  return src_index, new_length, new_state


# ----------------------------------------------------------------------------------------------------------------
# Position simulation (tests, benchmarks, plots): which original tokens each layer holds.
# ----------------------------------------------------------------------------------------------------------------


class LadderTrace(NamedTuple):
  """What `simulate_ladder` saw.

  Attributes:
    kept: {tokens seen: int32 [num_layers, length]} original token positions each layer holds (slot order) after
      the compaction call that followed the `tokens`-th token, for each requested checkpoint.
    lengths: int32 [calls], the length after each compaction call (call 0 follows the prefill).
    states: `LadderState` of numpy arrays with a leading [calls] axis, the state after each call.
  """

  kept: dict[int, np.ndarray]
  lengths: np.ndarray
  states: LadderState


@functools.partial(jax.jit, static_argnames=("cfg", "prefill_len", "num_tokens", "checkpoints"))
def _simulate(cfg: LadderConfig, prefill_len: int, num_tokens: int, checkpoints: tuple[int, ...]):
  n = cfg.num_layers
  capacity = max(prefill_len, cfg.stream_capacity)
  slot = jnp.arange(capacity, dtype=jnp.int32)
  checkpoint_at = jnp.asarray(checkpoints, jnp.int32).reshape(-1)  # [K]

  def compact(positions, length, state):
    src, length, state = ladder_plan(cfg, state, length, capacity)
    positions = jnp.take_along_axis(positions, jnp.maximum(src, 0), axis=1)
    return jnp.where(src >= 0, positions, -1), length, state

  def snap(snapshots, positions, tokens):
    # Row k of `snapshots` [K + 1, N, capacity] records checkpoint k; row K is scratch for every other step.
    k = jnp.argmax(jnp.append(checkpoint_at == tokens, True))
    return snapshots.at[k].set(positions)

  positions = jnp.broadcast_to(jnp.where(slot < prefill_len, slot, -1), (n, capacity))  # [N, capacity]
  positions, length, state = compact(positions, jnp.int32(prefill_len), init_ladder_state(cfg))
  snapshots = snap(jnp.full((len(checkpoints) + 1, n, capacity), -1, jnp.int32), positions, prefill_len)

  def step(carry, token):
    positions, length, state, snapshots = carry
    positions = positions.at[:, length].set(token)
    positions, length, state = compact(positions, length + 1, state)
    return (positions, length, state, snap(snapshots, positions, token + 1)), (length, state)

  tokens = jnp.arange(prefill_len, num_tokens, dtype=jnp.int32)
  (_, _, _, snapshots), (lengths, states) = jax.lax.scan(step, (positions, length, state, snapshots), tokens)
  lengths = jnp.concatenate([length[None], lengths])
  states = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), state, states)
  return snapshots[:-1], lengths, states


def simulate_ladder(cfg: LadderConfig, num_tokens: int, checkpoints: Sequence[int] = (),
                    prefill_len: int = 1) -> LadderTrace:
  """Runs the jnp planner on a cache whose values are token positions.

  The first `prefill_len` tokens arrive at once and get one compaction call (prefill_len=1 is plain
  token-by-token streaming); every later token is appended alone and followed by a call, up to `num_tokens`.

  Args:
    cfg: the ladder.
    num_tokens: total tokens seen at the end.
    checkpoints: token counts in [prefill_len, num_tokens] at which to record the kept positions.
    prefill_len: tokens in the one-shot prefill.
  """
  checkpoints = tuple(sorted(set(int(t) for t in checkpoints)))
  if not 1 <= prefill_len <= num_tokens:
    raise ValueError(f"prefill_len={prefill_len} must be in [1, num_tokens={num_tokens}]")
  if checkpoints and (checkpoints[0] < prefill_len or checkpoints[-1] > num_tokens):
    raise ValueError(f"checkpoints={checkpoints} must lie in [prefill_len={prefill_len}, num_tokens={num_tokens}]")
  check_compaction(cfg, init_ladder_state(cfg), prefill_len)
  snapshots, lengths, states = jax.device_get(_simulate(cfg, prefill_len, num_tokens, checkpoints))
  kept = {t: snapshots[k, :, :lengths[t - prefill_len]] for k, t in enumerate(checkpoints)}
  return LadderTrace(kept=kept, lengths=lengths, states=states)


def kept_positions(cfg: LadderConfig, stream_len: int) -> np.ndarray:
  """int32 [num_layers, length]: the token positions each layer holds after streaming `stream_len` tokens."""
  return simulate_ladder(cfg, stream_len, (stream_len,)).kept[stream_len]


def kept_positions_oneshot(cfg: LadderConfig, prompt_len: int) -> np.ndarray:
  """int32 [num_layers, length]: the token positions each layer holds after a prefill and one compaction."""
  return simulate_ladder(cfg, prompt_len, (prompt_len,), prefill_len=prompt_len).kept[prompt_len]


# ----------------------------------------------------------------------------------------------------------------
# The cache policy: the planner applied to a `KVCache`.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LadderPolicy(CachePolicy):
  """LaCache: the ladder-shaped KV cache with iterative compaction (arXiv 2507.14204).

  The plan comes from `lacax.cache.ladder.ladder_plan`, which reproduces GATECH-EIC/LaCache's index arithmetic
  exactly (modular layer phase, first-compaction size compensation, startovers). The same policy serves both
  protocols of the reference:

    * token-by-token streaming (`ppl/`): `compact` after every step;
    * one-shot (`LongBench/`, `niah/`): a long prompt is prefilled into a large cache, one `compact` (usually a
      multi-pass startover) shrinks it to the decode capacity, then decode compacts after every token. Build
      such a policy with `LadderPolicy.for_prefill`, which derives cache_size and start_size as the reference
      drivers do.

  The reference assumes batch 1; lacax keeps one planner state per batch row, so padded rows of different
  lengths are laddered independently.

  Attributes:
    span, overlap: S and O; with N layers they fix the ladder (B, A, R). Requires S < N and O < S.
    cache_size: C, the nominal budget in tokens per layer.
    start_size: s, attention sinks (4 in the reference's perplexity driver).
    layer_mapping: "modular" (the reference code, default) or "contiguous" (the paper's layer blocks).
    rope_mode: "slot" (the reference's position shift, default) or "original".
  """

  span: int = 16
  overlap: int = 0
  cache_size: int = 256
  start_size: int = 4
  layer_mapping: str = "modular"
  rope_mode: str = "slot"

  def __post_init__(self):
    # What needs no layer count is checked here; span < layers and the budget are checked by `ladder()` as soon
    # as the model is known (`init`), before anything is compiled.
    for name in ("span", "cache_size", "start_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ladder {name}={getattr(self, name)} must be positive")
    if not 0 <= self.overlap < self.span:
      raise ValueError(f"ladder overlap={self.overlap} must be in [0, span={self.span})")
    if self.layer_mapping not in LAYER_MAPPINGS:
      raise ValueError(f"ladder layer_mapping={self.layer_mapping!r} must be one of {list(LAYER_MAPPINGS)}")
    if self.rope_mode not in ("slot", "original"):
      raise ValueError(f"ladder rope_mode={self.rope_mode!r} must be 'slot' or 'original'")

  @classmethod
  def for_prefill(cls, cfg: ModelConfig, *, span: int, overlap: int, budget: float, prompt_len: int,
                  model_max_len: int | None = None, protocol: str = "longbench", **kwargs) -> "LadderPolicy":
    """The one-shot setup of the reference drivers (see `LadderConfig.for_prefill`)."""
    ladder = LadderConfig.for_prefill(cfg.num_layers, span, overlap, budget, prompt_len,
                                                 model_max_len=model_max_len, protocol=protocol,
                                                 layer_mapping=kwargs.get("layer_mapping", "modular"))
    return cls(span=span, overlap=overlap, cache_size=ladder.cache_size, start_size=ladder.start_size, **kwargs)

  def ladder(self, num_layers: int) -> LadderConfig:
    """The planner's config for a model of `num_layers` layers (validates span < layers and the budget)."""
    return LadderConfig(num_layers=num_layers, span=self.span, overlap=self.overlap,
                                   cache_size=self.cache_size, start_size=self.start_size,
                                   layer_mapping=self.layer_mapping)

  def decode_capacity(self, cfg: ModelConfig, max_tokens: int) -> int:
    # The longest a layer gets right after an append: C + floor(R/2) + 1.
    return min(max_tokens, self.ladder(cfg.num_layers).stream_capacity)

  @property
  def sink_tokens(self) -> int:
    return self.start_size

  def max_held(self, cfg: ModelConfig, seen: int) -> np.ndarray:
    # A compaction leaves at most the (first-compaction compensated) cache size C + floor(R/2).
    ladder = self.ladder(cfg.num_layers)
    return np.full(cfg.num_layers, min(seen, ladder.cache_size + ladder.compensation))

  def init_state(self, cfg: ModelConfig) -> LadderState:
    return init_ladder_state(self.ladder(cfg.num_layers))

  def init(self, cfg: ModelConfig, batch_size: int, capacity: int, *, dtype=None) -> KVCache:
    cache = super().init(cfg, batch_size, capacity, dtype=dtype)
    # One planner state per batch row.
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch_size,) + x.shape), cache.state)
    return cache.replace(state=state)

  def compact(self, cache: KVCache, capacity: int | None = None) -> KVCache:
    ladder = self.ladder(cache.num_layers)
    out = capacity or cache.capacity
    length = cache.length[0]  # [B]; the ladder keeps every layer at the same length
    src, _, state = jax.vmap(lambda s, n: ladder_plan(ladder, s, n, out))(cache.state, length)
    src = jnp.transpose(src, (1, 0, 2))  # [B, N, out] -> [N, B, out]
    needed = jnp.any(length > cache.state.cache_size)
    return plans.apply_plan(cache, src, needed, capacity).replace(state=state)
