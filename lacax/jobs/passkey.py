"""Passkey retrieval and needle-in-a-haystack (NIAH) on a (context length x depth) grid, per cache policy.

The protocol of GATECH-EIC/LaCache `niah/pred.py`, generated offline (`lacax.eval.passkey`):

  1. every cell (length L tokens, depth d) holds `samples_per_cell` prompts (seeds `seed`, `seed + 1`, ...)
     fitted to at most L tokens with the needle at depth d;
  2. the prompt is prefilled with full attention (once, shared by every policy that reads the cache the same
     way), then each policy compacts the cache once to its budget C = int(budget * prompt tokens) (LaCache:
     `LadderPolicy.for_prefill(protocol="niah")`, 64 sinks) and decodes greedily, compacting after every token;
  3. a row decodes (answer tokens without BOS) + `extra_new_tokens` (1) tokens, i.e. the reference's
     len(tokenizer(answer).input_ids) for its BOS-adding Llama tokenizers, and passes when the answer string
     occurs in the stripped output (`score_passkey`).

Writes a table per policy (depth rows x length columns, pass rate), `results.json` (every cell, every sample's
output) and `heatmap.png` (one panel per policy, depth on y, length on x).

Two tasks share the job (`config.task`):

  passkey  the reference's landmark prompt: grass/sky/sun filler, "The pass key is X. Remember it. X is the pass
           key.", depth in filler characters, the filler restarting after the needle (the reference's quirk;
           `grid.suffix_mode="continue"` for a contiguous haystack);
  niah     a needle sentence in real prose (`haystack.path`; default the English prose shipped with Python),
           depth in tokens, contiguous haystack (kvpress / RULER style); the needle and the question come from
           `config.needle`.

`oneshot_generate` (also used by the LongBench job) runs one prefill per group of policies that read the cache
alike and hands the same prefilled cache to each of them; it equals `lacax.generate.generate` per policy.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import random
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lacax import generate as generation
from lacax.cache import registry
from lacax.cache.kv_cache import KVCache, init_cache
from lacax.cache.base import CachePolicy
from lacax.eval import passkey as pk
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.sampling import SamplingConfig

TASKS = ("passkey", "niah")

# --------------------------------------------------------------------------------------------------------------
# One prefill, many policies.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OneShotResult:
  """Greedy outputs of one batch of prompts under several policies.

  Attributes:
    tokens: {policy name: one list of generated ids per prompt (stop token included, padding removed)}.
    policies: {policy name: the policy that ran}.
    prefill_seconds: wall time of the prefill forwards (compilation included on first use of a shape).
    decode_seconds: {policy name: compaction hand-off + decode loop wall time}.
    prompt_tokens: real prompt tokens in the batch.
  """

  tokens: dict[str, list[list[int]]]
  policies: dict[str, CachePolicy]
  prefill_seconds: float
  decode_seconds: dict[str, float]
  prompt_tokens: int


def _prefill_signature(policy: CachePolicy) -> tuple[str, str | None, str]:
  """Policies with equal signatures read and record the prefill cache alike, so they can share one prefill."""
  return (policy.rope_mode, policy.score_mode, policy.score_agg)


@functools.partial(jax.jit, static_argnames=("cfg", "capacity", "rope_mode", "score_mode", "score_agg"))
def _prefill(params, tokens: jax.Array, lengths: jax.Array, *, cfg: ModelConfig, capacity: int, rope_mode: str,
             score_mode: str | None, score_agg: str) -> tuple[jax.Array, KVCache]:
  """Full-attention forward over right-padded prompts [B, T]: (greedy first token [B], cache of `capacity`)."""
  batch, width = tokens.shape
  t = jnp.arange(width, dtype=jnp.int32)[None, :]
  positions = jnp.where(t < lengths[:, None], t, -1)
  cache = init_cache(cfg, batch, capacity, rope_mode=rope_mode, score_mode=score_mode, score_agg=score_agg)
  logits, cache = llama.forward(params, tokens, positions, cache, cfg, logits_index=lengths - 1)
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "decode_capacity", "max_new_tokens", "stop_ids"))
def _handoff(cache: KVCache, first: jax.Array, lengths: jax.Array, *, cfg: ModelConfig, policy: CachePolicy,
             decode_capacity: int, max_new_tokens: int, stop_ids: tuple[int, ...]) -> generation.DecodeState:
  """The policy's one compaction of the prefilled cache, and the decode state after the first token.

  Mirrors the end of `lacax.generate.prefill`; the policy's own state (e.g. the ladder cursor per row) is
  attached to the shared cache first.
  """
  cache = cache.replace(state=policy.init(cfg, first.shape[0], 1).state)
  cache = policy.compact(cache, capacity=decode_capacity)
  return generation.initial_state(cache, first, lengths, jax.random.PRNGKey(0), max_new_tokens=max_new_tokens,
                                  stop_ids=stop_ids)


def oneshot_generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                     policies: Mapping[str, CachePolicy], *, max_new_tokens: int, stop_ids: Sequence[int] = (),
                     bucket: int = 64, pad_id: int = 0) -> OneShotResult:
  """Greedy generation of every prompt under every policy, prefilling once per prefill signature.

  For each policy this is `lacax.generate.generate(..., policy=policy)`: full-attention prefill, one
  `policy.compact(cache, capacity=policy.decode_capacity(...))`, then the compiled decode loop with compaction
  after every token. The prefill forward depends only on how the cache is read and scored (`rope_mode`,
  `score_mode`, `score_agg`), so policies that agree on those (full, StreamingLLM and LaCache; H2O and
  KVMerger) share it: on a CPU the prefill dominates, and this divides the job's time by the number of policies.

  Args:
    params, cfg: the model.
    prompts: token-id lists (right-padded into one batch).
    policies: {name: policy}.
    max_new_tokens: tokens generated per row at most (the stop token counts).
    stop_ids: a row stops after producing one of these.
    bucket: the padded width is a multiple of this (fewer compilations).
    pad_id: written after a row stops (never returned).

  Raises:
    ValueError: no policies, max_new_tokens < 1, or token ids outside the vocabulary.
  """
  if not policies:
    raise ValueError("oneshot_generate: policies is empty")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  tokens, lengths = generation.pad_prompts(prompts, bucket, pad_id)
  if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
    raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got range "
                     f"[{int(tokens.min())}, {int(tokens.max())}]")
  total = int(lengths.max()) + max_new_tokens
  stops = tuple(int(s) for s in stop_ids)
  groups: dict[tuple, list[str]] = collections.defaultdict(list)
  for name, policy in policies.items():
    groups[_prefill_signature(policy)].append(name)

  out: dict[str, list[list[int]]] = {}
  decode_seconds: dict[str, float] = {}
  prefill_seconds = 0.0
  for (rope_mode, score_mode, score_agg), names in groups.items():
    capacities = {name: policies[name].decode_capacity(cfg, total) for name in names}
    capacity = max(tokens.shape[1], *capacities.values())
    start = time.perf_counter()
    first, cache = _prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), cfg=cfg, capacity=capacity,
                            rope_mode=rope_mode, score_mode=score_mode, score_agg=score_agg)
    jax.block_until_ready(first)
    prefill_seconds += time.perf_counter() - start
    for name in names:
      start = time.perf_counter()
      statics = dict(cfg=cfg, policy=policies[name], max_new_tokens=max_new_tokens, stop_ids=stops)
      state = _handoff(cache, first, jnp.asarray(lengths), decode_capacity=capacities[name], **statics)
      state = generation.decode(params, state, sampling=SamplingConfig(), pad_id=pad_id, **statics)
      generated, counts = jax.device_get((state.out, state.num_generated))
      decode_seconds[name] = time.perf_counter() - start
      out[name] = [generated[b, :counts[b]].tolist() for b in range(len(prompts))]
  return OneShotResult(tokens={name: out[name] for name in policies}, policies=dict(policies),
                       prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                       prompt_tokens=int(lengths.sum()))


def batches_by_policy(items: Sequence[Any], policies_for: Callable[[Any], Mapping[str, CachePolicy]],
                      batch_size: int) -> list[tuple[list[Any], dict[str, CachePolicy]]]:
  """Splits `items` into batches of at most `batch_size` whose items all get the same policies.

  Policies built from a prompt's length (e.g. LaCache's cache_size = budget * prompt tokens) differ between
  prompts of different lengths; a batch shares one static policy per name, so items are grouped by their
  policies first (in order of first appearance), then chunked.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  groups: dict[tuple, tuple[dict[str, CachePolicy], list[Any]]] = {}
  for item in items:
    policies = dict(policies_for(item))
    key = tuple(sorted(policies.items()))
    groups.setdefault(key, (policies, []))[1].append(item)
  batches = []
  for policies, members in groups.values():
    for begin in range(0, len(members), batch_size):
      batches.append((members[begin:begin + batch_size], policies))
  return batches


def progress_bar(total: int, desc: str, unit: str = "prompt"):
  """A tqdm bar (or None when tqdm is missing) that the jobs advance with `update(n, **postfix)`."""
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0)


def input_ids_fn(tokenizer, chat: bool) -> Callable[[str], list[int]]:
  """Text -> the ids fed to the model: the raw prompt (with the tokenizer's BOS rule), or wrapped as one user
  turn of the chat template (`chat=True`; the template's own BOS text is kept, no second BOS is added)."""
  if not chat:
    return tokenizer.encode
  if not tokenizer.has_chat_template:
    raise ValueError("chat=True but the model's tokenizer has no chat template; set chat=False")

  def encode(text: str) -> list[int]:
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(wrapped, add_bos=False)

  return encode


# --------------------------------------------------------------------------------------------------------------
# The grid.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GridSample:
  """One prompt of the grid.

  Attributes:
    length: the cell's context length in tokens (the column); the prompt has at most this many tokens.
    depth: the cell's nominal needle depth in [0, 1] (the row); `sample.depth` is the realised one.
    seed: the seed that drew the needle's number.
    sample: the prompt text, answer and needle placement.
    ids: the token ids fed to the model.
    new_tokens: tokens the row decodes and is scored on.
  """

  length: int
  depth: float
  seed: int
  sample: pk.NeedleSample
  ids: tuple[int, ...]
  new_tokens: int


NIAH_DEFAULTS = dict(
    task_description=("Some special magic numbers are hidden within the following text. Make sure to memorize "
                      "it. I will quiz you about the numbers afterwards."),
    template="The special magic number is: {answer}.",
    question="What is the special magic number mentioned in the provided text? The special magic number is",
    digits=7,
)
"""RULER-style single needle (niah_single): a 7-digit number in prose, asked for after the haystack."""


def niah_answer(seed: int, digits: int) -> str:
  """A `digits`-digit number drawn from `random.Random(seed)` (the global RNG is untouched)."""
  return str(random.Random(seed).randint(10 ** (digits - 1), 10 ** digits - 1))


def build_grid(tokenize: Callable[[str], Sequence[int]], *, task: str, lengths: Sequence[int],
               depths: Sequence[float], samples_per_cell: int, seed: int = 0, depth_unit: str = "chars",
               suffix_mode: str = "restart", extra_new_tokens: int = 1,
               answer_tokenize: Callable[[str], Sequence[int]] | None = None, haystack: str | None = None,
               needle: Mapping[str, Any] | None = None) -> list[GridSample]:
  """Every prompt of the grid, lengths x depths x seeds, fitted to the token budgets (`pk.fit_to_tokens`).

  Args:
    tokenize: text -> the ids the model will see (chat wrapping included): lengths are counted with it.
    task: "passkey" (the reference's prompt) or "niah" (needs `haystack`).
    lengths: context lengths in tokens; each prompt has at most that many tokens.
    depths: needle depths in [0, 1].
    samples_per_cell: seeds seed, seed + 1, ... per cell (the same seeds in every cell, as the reference).
    depth_unit, suffix_mode: see `lacax.eval.passkey.niah_sample`.
    extra_new_tokens: decoded tokens beyond len(answer_tokenize(answer)): 1 with a BOS-free answer count
      reproduces the reference's count (which includes the BOS of its Llama tokenizers) and leaves room for the
      space token byte-level BPE models emit before the digits (configs/passkey.py).
    answer_tokenize: tokenizer for the answer's token count (default `tokenize`; the job passes the tokenizer
      without BOS).
    haystack: the NIAH prose.
    needle: NIAH needle settings (`NIAH_DEFAULTS` keys).

  Raises:
    ValueError: naming the field, for an unknown task, a depth outside [0, 1], or a length below the prompt
      without any filler.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} must be one of {list(TASKS)}")
  answer_tokenize = answer_tokenize or tokenize
  needle = {**NIAH_DEFAULTS, **(needle or {})}
  if task == "niah" and not haystack:
    raise ValueError("task='niah' needs a haystack text (haystack.path)")
  grid = []
  for length in lengths:
    for depth in depths:
      for s in range(seed, seed + samples_per_cell):
        if task == "passkey":
          make = functools.partial(pk.passkey_sample, seed=s, depth=depth, depth_unit=depth_unit,
                                   tokenize=tokenize if depth_unit == "tokens" else None, suffix_mode=suffix_mode)
        else:
          answer = niah_answer(s, int(needle["digits"]))
          make = functools.partial(
              pk.niah_sample, needle=needle["template"].format(answer=answer), answer=answer,
              question=needle["question"], depth=depth, haystack=haystack,
              task_description=needle["task_description"], suffix_mode=suffix_mode, depth_unit=depth_unit,
              tokenize=tokenize if depth_unit == "tokens" else None, seed=s)
        try:
          sample = pk.fit_to_tokens(make, length, tokenize)
        except ValueError as e:
          raise ValueError(f"grid.lengths contains {length}: {e}") from None
        new_tokens = len(answer_tokenize(sample.answer)) + extra_new_tokens
        grid.append(GridSample(length=length, depth=depth, seed=s, sample=sample, ids=tuple(tokenize(sample.prompt)),
                               new_tokens=new_tokens))
  return grid


def completion_text(tokenizer, tokens: Sequence[int], new_tokens: int) -> str:
  """The reference's answer text: the first `new_tokens` generated ids, decoded without special tokens, stripped."""
  return tokenizer.decode(list(tokens)[:new_tokens], skip_special_tokens=True).strip()


def pass_rate_grid(grid: Sequence[GridSample], correct: Sequence[bool], lengths: Sequence[int],
                   depths: Sequence[float]) -> np.ndarray:
  """[len(depths), len(lengths)] fraction of the cell's samples that passed (NaN for an empty cell)."""
  if len(grid) != len(correct):
    raise ValueError(f"{len(grid)} samples but {len(correct)} scores")
  passed = np.zeros((len(depths), len(lengths)))
  count = np.zeros((len(depths), len(lengths)))
  row = {d: i for i, d in enumerate(depths)}
  col = {n: j for j, n in enumerate(lengths)}
  for sample, ok in zip(grid, correct):
    i, j = row[sample.depth], col[sample.length]
    passed[i, j] += bool(ok)
    count[i, j] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, passed / np.maximum(count, 1), np.nan)


def length_label(n: int) -> str:
  """512 -> "512", 1024 -> "1k", 131072 -> "128k"."""
  return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def format_grid(name: str, rates: np.ndarray, lengths: Sequence[int], depths: Sequence[float]) -> str:
  """A text table: depth rows x length columns of pass rates in %, with the column means and the overall mean."""
  header = f"{'depth':>7}" + "".join(f"{length_label(n):>8}" for n in lengths) + f"{'mean':>8}"
  lines = [f"{name}: mean pass rate {100 * np.nanmean(rates):.1f}%", header]
  for i, depth in enumerate(depths):
    lines.append(f"{100 * depth:>6.0f}%" + "".join(f"{100 * r:>8.0f}" for r in rates[i]) +
                 f"{100 * np.nanmean(rates[i]):>8.1f}")
  lines.append(f"{'mean':>7}" + "".join(f"{100 * np.nanmean(rates[:, j]):>8.1f}" for j in range(len(lengths))) +
               f"{100 * np.nanmean(rates):>8.1f}")
  return "\n".join(lines)


def plot_heatmaps(rates: Mapping[str, np.ndarray], lengths: Sequence[int], depths: Sequence[float], path: str,
                  title: str) -> None:
  """One panel per policy: pass rate (%) coloured red -> green, depth on y (0% at the top), length on x."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(rates)
  width = max(3.0, 0.7 * len(lengths) + 1.5)
  fig, axes = plt.subplots(1, len(names), figsize=(width * len(names) + 1.0, 0.35 * len(depths) + 2.0),
                           squeeze=False, layout="constrained")
  image = None
  for ax, name in zip(axes[0], names):
    grid = 100 * rates[name]
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        if not math.isnan(grid[i, j]):
          ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_title(f"{name} ({np.nanmean(grid):.1f}%)")
  axes[0][0].set_ylabel("needle depth")
  fig.colorbar(image, ax=axes[0].tolist(), label="pass rate (%)", shrink=0.8)
  fig.suptitle(title)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Config validation and the job.
# --------------------------------------------------------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def validate_oneshot_fields(config: ml_collections.ConfigDict, budget_of: str) -> None:
  """Checks `batch_size`, `policies` and `cache.budget` (a fraction of `budget_of`), shared by the one-shot jobs."""
  _check(isinstance(config.batch_size, int) and config.batch_size >= 1,
         f"batch_size={config.batch_size!r} must be an int >= 1")
  _check(len(config.policies) > 0, "policies is empty: expected names such as ('full', 'streaming', 'lacache')")
  for name in config.policies:
    _check(name in registry.POLICIES, f"policies contains {name!r}; expected names from {sorted(registry.POLICIES)}")
  _check(len(set(config.policies)) == len(config.policies), f"policies={tuple(config.policies)!r} has duplicates")
  budget = config.cache.budget
  _check(isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0,
         f"cache.budget={budget!r} must be a positive fraction of {budget_of} (0.5 in the LaCache paper)")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the job reads; each message names the field, the value and what is expected."""
  _check(config.task in TASKS, f"task={config.task!r} must be one of {list(TASKS)}")
  grid = config.grid
  lengths = tuple(grid.lengths)
  _check(len(lengths) > 0 and all(isinstance(n, int) and n > 0 for n in lengths),
         f"grid.lengths={lengths!r} must be a non-empty tuple of positive token counts")
  _check(len(set(lengths)) == len(lengths), f"grid.lengths={lengths!r} has duplicates")
  depths = tuple(grid.depths)
  _check(len(depths) > 0 and all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in depths),
         f"grid.depths={depths!r} must be a non-empty tuple of fractions in [0, 1]")
  _check(len(set(depths)) == len(depths), f"grid.depths={depths!r} has duplicates")
  _check(isinstance(grid.samples_per_cell, int) and grid.samples_per_cell >= 1,
         f"grid.samples_per_cell={grid.samples_per_cell!r} must be an int >= 1")
  _check(grid.depth_unit in pk.DEPTH_UNITS, f"grid.depth_unit={grid.depth_unit!r} must be one of {pk.DEPTH_UNITS}")
  _check(grid.suffix_mode in pk.SUFFIX_MODES,
         f"grid.suffix_mode={grid.suffix_mode!r} must be one of {pk.SUFFIX_MODES}")
  _check(isinstance(config.extra_new_tokens, int) and config.extra_new_tokens >= 0,
         f"extra_new_tokens={config.extra_new_tokens!r} must be an int >= 0")
  validate_oneshot_fields(config, budget_of="the prompt")
  if config.task == "niah":
    _check("{answer}" in config.needle.template,
           f"needle.template={config.needle.template!r} must contain '{{answer}}'")
    _check(isinstance(config.needle.digits, int) and 1 <= config.needle.digits <= 18,
           f"needle.digits={config.needle.digits!r} must be an int in [1, 18]")


def generate_grid(model, grid: Sequence[GridSample], config: ml_collections.ConfigDict
                  ) -> tuple[dict[str, list[list[int]]], dict[str, Any]]:
  """Generates every grid prompt under every policy of `config.policies`, batching prompts of equal length.

  Returns:
    ({policy: generated ids per grid sample, in grid order}, timings: prefill seconds and tokens/s, decode
    seconds per policy).
  """
  def policies_for(i: int) -> dict[str, CachePolicy]:
    return {name: registry.make_prefill_policy(name, config.cache, model.cfg, prompt_len=len(grid[i].ids),
                                               protocol="niah") for name in config.policies}

  # Equal prompt lengths get equal policies, so sorting by length makes full batches.
  order = sorted(range(len(grid)), key=lambda i: (len(grid[i].ids), i))
  batches = batches_by_policy(order, policies_for, config.batch_size)  # builds (and validates) every policy first
  outputs: dict[str, list[list[int]]] = {name: [[] for _ in grid] for name in config.policies}
  prefill_seconds, prefill_tokens = 0.0, 0
  decode_seconds = collections.Counter()
  bar = progress_bar(len(grid), f"{config.task} ({len(config.policies)} policies)")
  for members, policies in batches:
    result = oneshot_generate(model.params, model.cfg, [grid[i].ids for i in members], policies,
                              max_new_tokens=max(grid[i].new_tokens for i in members),
                              stop_ids=model.tokenizer.stop_ids)
    prefill_seconds += result.prefill_seconds
    prefill_tokens += result.prompt_tokens
    decode_seconds.update(result.decode_seconds)
    for name in config.policies:
      for row, i in enumerate(members):
        outputs[name][i] = result.tokens[name][row]
    if bar is not None:
      bar.update(len(members))
      bar.set_postfix_str(f"len {len(grid[members[0]].ids)}, prefill "
                          f"{prefill_tokens / max(prefill_seconds, 1e-9):.0f} tok/s")
  if bar is not None:
    bar.close()
  return outputs, {"prefill_seconds": prefill_seconds, "decode_seconds": dict(decode_seconds),
                   "prefill_tokens_per_second": prefill_tokens / max(prefill_seconds, 1e-9)}


def run(config: ml_collections.ConfigDict, run_dir: str, *, model=None) -> dict[str, Any]:
  """Runs the grid for every policy; prints the tables, writes `heatmap.png`, returns the figures.

  Args:
    config: a `configs/passkey.py` / `configs/niah.py` config.
    run_dir: where the plot goes (the launcher writes config.json and results.json there).
    model: an already loaded `lacax.weights.loader.Model` (tests); default `load_model(config.model.path)`.
  """
  from lacax.eval.texts import load_text  # pylint: disable=g-import-not-at-top
  from lacax.weights.loader import load_model  # pylint: disable=g-import-not-at-top

  validate_config(config)
  model = model or load_model(config.model.path or None, dtype=config.model.dtype)
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"model.path={config.model.path!r} ships no tokenizer; the {config.task} job needs one")
  lengths, depths = tuple(config.grid.lengths), tuple(float(d) for d in config.grid.depths)
  tokenize = input_ids_fn(tok, config.chat)
  needle, haystack = None, None
  if config.task == "niah":
    needle = config.needle.to_dict()
    haystack = load_text(config.haystack.path, config.haystack.field)
  start = time.perf_counter()
  grid = build_grid(tokenize, task=config.task, lengths=lengths, depths=depths,
                    samples_per_cell=config.grid.samples_per_cell, seed=config.grid.seed,
                    depth_unit=config.grid.depth_unit, suffix_mode=config.grid.suffix_mode,
                    extra_new_tokens=config.extra_new_tokens,
                    answer_tokenize=lambda text: tok.encode(text, add_bos=False), haystack=haystack,
                    needle=needle)
  logging.info("built %d prompts in %.1fs", len(grid), time.perf_counter() - start)
  longest = max(len(s.ids) + s.new_tokens for s in grid)
  if longest > model.cfg.max_position_embeddings:
    logging.warning("the longest prompt + answer has %d tokens, beyond the model's trained context %d",
                    longest, model.cfg.max_position_embeddings)

  outputs, timing = generate_grid(model, grid, config)

  rates, figures, records = {}, {}, []
  correct: dict[str, list[bool]] = {name: [] for name in config.policies}
  for i, sample in enumerate(grid):
    record = {"length": sample.length, "depth": sample.depth, "seed": sample.seed, "prompt_tokens": len(sample.ids),
              "realised_depth": sample.sample.depth, "answer": sample.sample.answer, "outputs": {}}
    for name in config.policies:
      text = completion_text(tok, outputs[name][i], sample.new_tokens)
      ok = pk.score_passkey(text, sample.sample.answer)
      correct[name].append(ok)
      record["outputs"][name] = {"text": text, "correct": ok}
    records.append(record)
  example_len = max(len(s.ids) for s in grid)
  print(f"\n{config.task}: {model.cfg.name}, {len(grid)} prompts ({config.grid.samples_per_cell} per cell), "
        f"budget {config.cache.budget} of the prompt, pass rate (%) per needle depth x context length")
  for name in config.policies:
    rates[name] = pass_rate_grid(grid, correct[name], lengths, depths)
    policy = registry.make_prefill_policy(name, config.cache, model.cfg, prompt_len=example_len, protocol="niah")
    figures[name] = {
        "pass_rate": rates[name].tolist(), "mean": float(np.nanmean(rates[name])),
        "by_length": np.nanmean(rates[name], axis=0).tolist(), "by_depth": np.nanmean(rates[name], axis=1).tolist(),
        "decode_seconds": timing["decode_seconds"][name], "policy_at_longest_prompt": repr(policy),
    }
    print("\n" + format_grid(name, rates[name], lengths, depths))
  print("\n" + f"{'policy':<12}{'mean %':>8}" + "".join(f"{length_label(n):>8}" for n in lengths))
  for name in config.policies:
    print(f"{name:<12}{100 * figures[name]['mean']:>8.1f}" +
          "".join(f"{100 * r:>8.1f}" for r in figures[name]["by_length"]))
  plot_path = os.path.join(run_dir, "heatmap.png")
  plot_heatmaps(rates, lengths, depths, plot_path,
                f"{config.task}: {model.cfg.name}, budget {config.cache.budget}, "
                f"{config.grid.samples_per_cell} samples/cell")
  print(f"plot: {plot_path}")
  return {"figures": figures, "lengths": list(lengths), "depths": list(depths), "model": model.cfg.name,
          "task": config.task, "samples": records, "prefill_seconds": timing["prefill_seconds"],
          "prefill_tokens_per_second": timing["prefill_tokens_per_second"], "model_fingerprint": model.fingerprint()}
