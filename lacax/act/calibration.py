"""ACT online attention calibration: find hidden attention sinks in post-softmax attention and damp them.

ACT (Yu et al., "Unveiling and Harnessing Hidden Attention Sinks", arXiv 2406.15765; reference code
GATECH-EIC/ACT @ a267af7, `models/llama_modelling_aug.py::atten_process_eval`) edits the attention
probabilities A [queries T, keys S] of selected (layer, head) pairs at every forward:

1. Sink score of key j = (sum over the queries of A[q, j]) / (number of queries that can see key j). The
   reference divides the column sums by [q_len, q_len - 1, ..., 1]: that *is* the number of queries that see
   key j under the causal mask of an unpadded prefill, and it broadcasts to 1 in a cached decode step
   (q_len = 1), where the score is the row itself. lacax states it from the attention mask,
   `viewers[j] = sum_q visible[q, j]` over real (non-padding) queries, which reduces to both reference cases
   and extends to right-padded batches, chunked prefill and compacted caches.
2. Sinks = keys with score > threshold, minus the first (lowest slot index) detected key, which is normally the
   initial / BOS sink and is left untouched. `threshold_mode="absolute"`: threshold = `threshold` (0.1 in
   the reference scripts, the default); `"alpha_over_n"`: threshold = alpha / N (the paper's formulation,
   alpha in {3, 5, 7}), with N the number of keys the step's real queries can see (the sequence length in
   prefill, the context length in decode).
3. For every row: freed = (1 - beta) * (attention on sinks); sink entries are multiplied by beta; the freed
   mass goes to the non-sink columns in proportion to the row's original attention over them. Row sums stay 1.

Reference quirks and how lacax generalises them (`ACTConfig.first_row`):

* The reference computes the proportions from a copy of A whose sink columns are zeroed *for rows >= 1 only*,
  and finally sets A[0, 0] = 1. In an unpadded prefill this is a no-op (query 0 sees only key 0, and key 0
  can never be a sink: if detected it is the first detected), so `first_row="consistent"` (default) treats
  every row alike and equals the reference exactly in prefill. In a cached decode step the only row *is*
  row 0, and the reference then redistributes onto the sink columns too and overwrites A[0, 0] with 1, so
  the row no longer sums to 1 (this is what its MT-Bench path runs). `first_row="reference"` reproduces that
  literally (query index 0 of each forward, slot 0) for bit-for-bit comparisons.
* The reference calibrates batch element 0 only (it runs batch size 1); lacax calibrates every batch row,
  each with its own sinks.
* A row whose non-sink attention is zero would divide by zero in the reference (NaN); lacax leaves it
  unchanged (nothing can receive the mass). Padding queries (no visible key) are left unchanged and do not
  count towards any sink score.

The set of calibrated heads is static (`ACTConfig.heads`): `make_probs_hook` bakes it into the compiled program
as a constant; `make_traced_probs_hook` takes it as a traced [layers, heads] array so that a head-selection
sweep compiles once. Under GQA the probabilities are [B, KV, G, T, S] and query head h = kv * G + g.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import init_cache
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.model.llama import ProbsHook
from lacax.results import write_json

THRESHOLD_MODES = ("absolute", "alpha_over_n")
FIRST_ROW_MODES = ("consistent", "reference")


def _canonical_heads(heads: Any) -> frozenset[tuple[int, int]] | tuple[tuple[bool, ...], ...]:
  """A frozenset of (layer, head) pairs, or a [layers][heads] tuple of bool tuples; raises on anything else.

  Sets and integer [n, 2] sequences are (layer, head) pairs; boolean 2-D sequences / arrays are masks.
  """
  if isinstance(heads, (list, tuple)) and len(heads) == 0:
    return frozenset()
  if isinstance(heads, (list, tuple, np.ndarray)):
    array = np.asarray(heads)
    if array.ndim == 2 and array.dtype == bool:
      return tuple(tuple(bool(x) for x in row) for row in array)
    if array.ndim == 2 and array.shape[1] == 2 and np.issubdtype(array.dtype, np.integer):
      heads = {tuple(int(x) for x in row) for row in array}
  if isinstance(heads, (frozenset, set)):
    pairs = []
    for item in heads:
      if (not isinstance(item, tuple) or len(item) != 2
          or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in item)):
        raise ValueError(f"ACTConfig.heads: element {item!r} must be a (layer, head) pair of ints")
      if item[0] < 0 or item[1] < 0:
        raise ValueError(f"ACTConfig.heads: element {item!r} must have non-negative layer and head")
      pairs.append((int(item[0]), int(item[1])))
    return frozenset(pairs)
  raise ValueError(f"ACTConfig.heads={heads!r} must be a set of (layer, head) int pairs or a 2-D "
                   "[layers][heads] boolean mask (tuple of tuples of bool)")


@dataclasses.dataclass(frozen=True)
class ACTConfig:
  """Which heads ACT calibrates and how. Frozen and hashable: a static argument of `jax.jit`.

  Attributes:
    heads: the calibrated heads: a frozenset of (layer, head) pairs (query-head index), or a [layers][heads]
      tuple of bool tuples. Lists, sets and numpy arrays are converted. Empty = ACT off.
    beta: factor applied to the attention on hidden sinks, in [0, 1] (reference 0.4).
    threshold_mode: "absolute" (reference code) or "alpha_over_n" (paper).
    threshold: the absolute sink threshold on the mean attention received, in (0, 1] (reference 0.1).
    alpha: the paper's alpha: a key is a sink when its mean attention > alpha / N (N = visible keys); > 0.
    first_row: "consistent" (every row treated alike; equals the reference in prefill) or "reference" (the
      reference's row-0 special case and final A[0, 0] = 1, which matters in cached decode only).
  """

  heads: Any = frozenset()
  beta: float = 0.4
  threshold_mode: str = "absolute"
  threshold: float = 0.1
  alpha: float = 5.0
  first_row: str = "consistent"

  def __post_init__(self):
    object.__setattr__(self, "heads", _canonical_heads(self.heads))
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"ACTConfig.beta={self.beta} must be in [0, 1]")
    if self.threshold_mode not in THRESHOLD_MODES:
      raise ValueError(f"ACTConfig.threshold_mode={self.threshold_mode!r} is not supported; expected one of "
                       f"{THRESHOLD_MODES}")
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"ACTConfig.threshold={self.threshold} must be in (0, 1]")
    if not self.alpha > 0.0:
      raise ValueError(f"ACTConfig.alpha={self.alpha} must be > 0")
    if self.first_row not in FIRST_ROW_MODES:
      raise ValueError(f"ACTConfig.first_row={self.first_row!r} is not supported; expected one of "
                       f"{FIRST_ROW_MODES}")

  @property
  def head_set(self) -> frozenset[tuple[int, int]]:
    """The calibrated heads as a frozenset of (layer, head) pairs."""
    if isinstance(self.heads, frozenset):
      return self.heads
    return frozenset((l, h) for l, row in enumerate(self.heads) for h, on in enumerate(row) if on)

  def head_mask(self, num_layers: int, num_heads: int) -> np.ndarray:
    """[num_layers, num_heads] bool mask of the calibrated heads.

    Raises:
      ValueError: a head lies outside the model, or a tuple mask has another shape (the message names it).
    """
    if isinstance(self.heads, tuple) and self.heads:
      shape = (len(self.heads), len(self.heads[0]))
      if any(len(row) != shape[1] for row in self.heads) or shape != (num_layers, num_heads):
        raise ValueError(f"ACTConfig.heads mask has shape {shape} (rows of lengths "
                         f"{sorted({len(r) for r in self.heads})}); the model needs ({num_layers}, {num_heads})")
    mask = np.zeros((num_layers, num_heads), bool)
    for layer, head in self.head_set:
      if layer >= num_layers or head >= num_heads:
        raise ValueError(f"ACTConfig.heads contains (layer={layer}, head={head}), outside the model's "
                         f"{num_layers} layers x {num_heads} heads")
      mask[layer, head] = True
    return mask

  def replace(self, **changes: Any) -> "ACTConfig":
    return dataclasses.replace(self, **changes)


# --- the calibration itself --------------------------------------------------------------------------------


def infer_visibility(probs: jax.Array) -> jax.Array:
  """Which (query, key) entries were visible, read off the probabilities alone.

  A masked entry is exactly 0 after lacax's softmax, and a padding query's row is exactly uniform over every
  slot (`llama.attention` masks it completely). So visible = probs > 0, except in rows whose entries are all
  equal and span more than one slot, which count as padding. Caveats: a visible key whose probability
  underflows to 0 (logit gap > ~100) is treated as masked, and a real row that is exactly uniform over the
  whole cache is treated as padding. Pass an explicit mask (`visibility_from_positions`) where you have one.

  Args:
    probs: [..., T, S] post-softmax attention.

  Returns:
    [..., T, S] bool.
  """
  row_min = jnp.min(probs, axis=-1, keepdims=True)
  row_max = jnp.max(probs, axis=-1, keepdims=True)
  padding_row = (row_min == row_max) & (probs.shape[-1] > 1)
  return (probs > 0) & ~padding_row


def visibility_from_positions(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
  """The attention mask `llama.forward` builds: [B, T, S] (or [B, KV, T, S] for per-head key positions).

  Args:
    query_positions: [B, T] int32 original positions of the step's tokens, -1 for padding.
    key_positions: [B, S] (or [B, KV, S]) int32 original positions held by the cache slots, -1 = empty.
  """
  q = query_positions[:, None, :, None] if key_positions.ndim == 3 else query_positions[:, :, None]
  k = key_positions[..., None, :]
  return (k >= 0) & (k <= q) & (q >= 0)


def _broadcast_visibility(visible: jax.Array, probs: jax.Array) -> jax.Array:
  """[B, T, S] or [B, KV, T, S] masks get the missing head axes of [B, KV, G, T, S] probabilities."""
  if probs.ndim == 5 and visible.ndim == 3:
    visible = visible[:, None, None]
  elif probs.ndim == 5 and visible.ndim == 4:
    visible = visible[:, :, None]
  return jnp.broadcast_to(visible, probs.shape)


def sink_scores(probs: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean attention each key receives from the queries that can see it.

  Args:
    probs: [..., T, S] float32 post-softmax attention.
    visible: [..., T, S] bool, True where real query t may attend key s.

  Returns:
    score [..., S] float32 (0 for keys no query sees) and viewers [..., S] int32 (queries that see the key).
  """
  received = jnp.sum(jnp.where(visible, probs, 0.0), axis=-2)
  viewers = jnp.sum(visible, axis=-2, dtype=jnp.int32)
  return received / jnp.maximum(viewers, 1).astype(probs.dtype), viewers


def hidden_sinks(probs: jax.Array, visible: jax.Array, cfg: ACTConfig) -> jax.Array:
  """[..., S] bool: the keys ACT damps (detected sinks except the first one).

  Args:
    probs: [..., T, S] float32 post-softmax attention.
    visible: [..., T, S] bool visibility of real queries (broadcast already).
    cfg: threshold settings.
  """
  score, viewers = sink_scores(probs, visible)
  if cfg.threshold_mode == "absolute":
    threshold = jnp.asarray(cfg.threshold, probs.dtype)
  else:
    n_keys = jnp.sum(viewers > 0, axis=-1, keepdims=True)
    threshold = cfg.alpha / jnp.maximum(n_keys, 1).astype(probs.dtype)
  detected = (score > threshold) & (viewers > 0)
  first = detected & (jnp.cumsum(detected, axis=-1, dtype=jnp.int32) == 1)
  return detected & ~first


def calibrate_probs(probs: jax.Array, visible: jax.Array | None = None, cfg: ACTConfig = ACTConfig()
                    ) -> jax.Array:
  """Applies ACT to every head of `probs` (select heads with `make_probs_hook`).

  Args:
    probs: [..., T, S] float32 post-softmax attention, e.g. [B, KV, G, T, S] from `llama.attention` or a
      single [T, S] map. Rows are queries of this forward, columns cache slots.
    visible: bool mask broadcastable to probs ([B, T, S] or [B, KV, T, S] for 5-D probs), True where a real
      query may attend a key; None infers it from the probabilities (`infer_visibility`).
    cfg: beta, threshold mode and first-row handling (`cfg.heads` is ignored here).

  Returns:
    Calibrated probabilities, same shape and dtype; rows of padding queries unchanged.
  """
  visible = infer_visibility(probs) if visible is None else _broadcast_visibility(visible, probs)
  sinks = hidden_sinks(probs, visible, cfg)[..., None, :]  # [..., 1, S]
  beta = jnp.asarray(cfg.beta, probs.dtype)
  freed = jnp.sum(jnp.where(sinks, probs, 0.0), axis=-1, keepdims=True) * (1 - beta)
  # Proportions of the redistribution: the row's original attention with the sink columns zeroed.
  base = jnp.where(sinks, 0.0, probs)
  num_queries, num_keys = probs.shape[-2:]
  query_index = jnp.arange(num_queries)[:, None]
  if cfg.first_row == "reference":
    base = jnp.where(query_index == 0, probs, base)
  total = jnp.sum(base, axis=-1, keepdims=True)
  ratios = base / jnp.where(total > 0, total, 1.0)
  out = jnp.where(sinks, probs * beta, probs) + freed * ratios
  if cfg.first_row == "reference":
    out = jnp.where((query_index == 0) & (jnp.arange(num_keys) == 0), 1.0, out)
  real_row = jnp.any(visible, axis=-1, keepdims=True)
  return jnp.where(real_row & (total > 0), out, probs).astype(probs.dtype)


def freed_mass(probs: jax.Array, visible: jax.Array | None, cfg: ACTConfig) -> jax.Array:
  """[..., T] attention mass ACT moves off hidden sinks in each row: (1 - beta) * sum over sinks (0 = no-op)."""
  visible = infer_visibility(probs) if visible is None else _broadcast_visibility(visible, probs)
  sinks = hidden_sinks(probs, visible, cfg)[..., None, :]
  real_row = jnp.any(visible, axis=-1)
  return jnp.where(real_row, jnp.sum(jnp.where(sinks, probs, 0.0), axis=-1) * (1 - cfg.beta), 0.0)


# --- hooks for llama.forward --------------------------------------------------------------------------------


def _selective_hook(select: jax.Array, cfg: ACTConfig, group_size: int, visible: jax.Array | None) -> ProbsHook:
  """A probs hook calibrating the heads where select[layer, head] is set; other layers skip the work."""

  def hook(probs: jax.Array, layer: jax.Array) -> jax.Array:
    batch, kv_heads, groups, _, _ = probs.shape
    del batch
    assert groups == group_size, (groups, group_size)
    on = (select[layer] > 0).reshape(kv_heads, groups)[None, :, :, None, None]

    def apply(p):
      return jnp.where(on, calibrate_probs(p, visible, cfg), p)

    return jax.lax.cond(jnp.any(on), apply, lambda p: p, probs)

  return hook


def make_probs_hook(act: ACTConfig, model_cfg: ModelConfig, visible: jax.Array | None = None
                    ) -> ProbsHook | None:
  """The deployment hook: ACT on `act.heads`, fixed at trace time (one compiled program per head set).

  Args:
    act: the calibration config; its head set must fit the model.
    model_cfg: the model (layer and head counts, GQA group size).
    visible: optional attention visibility ([B, T, S] or [B, KV, T, S]) of the forward the hook will run in
      (see `visibility_from_positions`); None infers it from the probabilities.

  Returns:
    A `probs_hook` for `llama.forward`, or None when no head is selected, so that the forward (and its
    logits) are exactly those of the uncalibrated model.
  """
  mask = act.head_mask(model_cfg.num_layers, model_cfg.num_heads)
  if not mask.any():
    return None
  return _selective_hook(jnp.asarray(mask), act, model_cfg.group_size, visible)


def make_traced_probs_hook(select: jax.Array, act: ACTConfig, model_cfg: ModelConfig,
                           visible: jax.Array | None = None) -> ProbsHook:
  """The sweep hook: ACT on the heads where the *traced* select [layers, heads] array is > 0.

  One compiled program serves every head set (a head-selection sweep passes one-hot masks); `act.heads` is
  ignored, only its beta / threshold settings are used. An all-zero select gives the uncalibrated values.
  """
  if select.shape != (model_cfg.num_layers, model_cfg.num_heads):
    raise ValueError(f"select has shape {select.shape}; expected ({model_cfg.num_layers}, {model_cfg.num_heads})")
  return _selective_hook(select, act, model_cfg.group_size, visible)


def record_attention(on_layer: Callable[[int, np.ndarray], None], reduce: Callable[[jax.Array], jax.Array]
                     = lambda probs: probs) -> ProbsHook:
  """A pass-through hook that sends `reduce(probs)` of every layer to the host (`jax.debug.callback`).

  For diagnostics only (attention maps, sink statistics): the host receives `on_layer(layer, value)` once per
  layer per forward, in no guaranteed order; the probabilities themselves are not changed.
  """

  def callback(layer, value):
    on_layer(int(layer), np.asarray(value))

  def hook(probs: jax.Array, layer: jax.Array) -> jax.Array:
    jax.debug.callback(callback, layer, reduce(probs))
    return probs

  return hook


# --- head masks on disk ---------------------------------------------------------------------------------------


def save_heads(path: str, heads: Iterable[tuple[int, int]], num_layers: int, num_heads: int,
               **metadata: Any) -> None:
  """Writes a head set as JSON: {"num_layers", "num_heads", "heads": [[layer, head], ...], "mask", ...}."""
  act = ACTConfig(heads=frozenset(heads))
  mask = act.head_mask(num_layers, num_heads)
  data = {"num_layers": num_layers, "num_heads": num_heads, "heads": sorted([list(p) for p in act.head_set]),
          "mask": mask.astype(int).tolist(), **metadata}
  write_json(path, data)


def load_heads(path: str, num_layers: int | None = None, num_heads: int | None = None
               ) -> frozenset[tuple[int, int]]:
  """Reads a head set written by `save_heads` (the "heads" list, or else the "mask").

  Raises:
    ValueError: the file describes another model shape than the one given, or has neither field.
  """
  with open(path) as f:
    data = json.load(f)
  for field, want in (("num_layers", num_layers), ("num_heads", num_heads)):
    if want is not None and field in data and data[field] != want:
      raise ValueError(f"head file {path!r} has {field}={data[field]}, the model has {want}")
  if "heads" in data:
    return ACTConfig(heads=frozenset(tuple(int(x) for x in p) for p in data["heads"])).head_set
  if "mask" in data:
    return ACTConfig(heads=np.asarray(data["mask"], bool)).head_set
  raise ValueError(f"head file {path!r} has neither 'heads' nor 'mask'")


def attention_maps(params: Any, model_cfg: ModelConfig, token_ids: Sequence[int]) -> np.ndarray:
  """[layers, heads, T, T] float32 post-softmax attention of one unpadded prompt (uncalibrated), for plots."""
  length = len(token_ids)
  maps = np.zeros((model_cfg.num_layers, model_cfg.num_heads, length, length), np.float32)

  def store(layer: int, probs: np.ndarray) -> None:
    maps[layer] = probs.reshape(model_cfg.num_heads, length, length)

  @jax.jit
  def run(params, tokens):
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    hook = record_attention(store, lambda probs: probs[0])
    logits, _ = llama.forward(params, tokens, positions, init_cache(model_cfg, 1, length), model_cfg,
                              logits_index=jnp.array([length - 1]), probs_hook=hook)
    return logits

  jax.block_until_ready(run(params, jnp.asarray([list(token_ids)], jnp.int32)))
  jax.effects_barrier()
  return maps
