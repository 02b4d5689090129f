"""The main job: token-by-token streaming perplexity of the full cache, StreamingLLM and LaCache.

The protocol of the LaCache and StreamingLLM papers (`ppl/run.py`, `examples/eval_long_ppl.py`): feed the text
one token at a time from an empty cache, take the NLL of the next token, compact after every step; PPL =
exp(mean NLL). Every policy runs as one compiled scan (compiled once, then no Python per token) at the same
cache budget. Writes a table (stdout), `results.json` and a plot of running perplexity against tokens.

Each policy's result is a unit of the run directory (`lacax.runs`): a resumed run skips the policies already
done. A non-finite NLL (NaN / inf) is flagged in the table ("NON-FINITE") and in the JSON ("error").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import ml_collections
import numpy as np

from lacax import errors
from lacax import jobs
from lacax import memory
from lacax import runs
from lacax.cache import registry
from lacax.cache.base import CachePolicy
from lacax.cache.registry import make_policy
from lacax.eval import perplexity
from lacax.eval.texts import load_text, text_problems
from lacax.progress import rate_callback
from lacax.weights import loader


def validate(config: ml_collections.ConfigDict) -> None:
  """Every problem of the fields the job reads, the data file, the model path and each policy against the
  model's shape, in one `ValidationError`, before the model is loaded."""
  problems = errors.Problems()
  problems.check(isinstance(config.num_tokens, int) and config.num_tokens >= 2,
                 f"num_tokens={config.num_tokens!r} must be an int >= 2")
  problems.check(isinstance(config.chunk, int) and config.chunk >= 1, f"chunk={config.chunk!r} must be an int >= 1")
  problems.check(len(config.policies) > 0, "policies is empty: expected names such as ('full', 'streaming', 'lacache')")
  for name in config.policies:
    problems.check(name in registry.POLICIES,
                   f"policies contains {name!r}; expected names from {sorted(registry.POLICIES)}")
  problems.check(len(set(config.policies)) == len(config.policies), f"policies={tuple(config.policies)!r} has "
                 "duplicates")
  problems.check(all(isinstance(t, int) and t > 0 for t in config.report_at),
                 f"report_at={tuple(config.report_at)!r} must be positive token counts")
  problems.check(isinstance(config.cache.size, int) and config.cache.size > 0,
                 f"cache.size={config.cache.size!r} must be a positive number of slots")
  problems.extend(text_problems(config.data.path, config.data.field, encoding=config.data.get("encoding", "utf-8"),
                                option="data"))
  model_problems = loader.model_path_problems(config.model.path, "model.path")
  problems.extend(model_problems)
  if not model_problems and not problems:  # every policy against the model's shape (e.g. span < layers)
    cfg = loader.read_model_config(config.model.path or None, dtype=config.model.dtype)
    for name in config.policies:
      try:
        policy = make_policy(name, config.cache)
        policy.decode_capacity(cfg, config.num_tokens)
      except ValueError as e:
        problems.add(f"policy {name!r} with cache={dict(config.cache)} on {cfg.name} ({cfg.num_layers} layers): {e}")
        continue
      problems.extend(f"policy {name!r}: {m}" for m in policy.run_problems(cfg))
      if registry.POLICIES[name].budgeted and not policy.compacts_in_decode:
        problems.add(prefill_only_problem(name))
      intervals = [k for k in _compression_intervals(policy) if k >= config.num_tokens - 1]
      if intervals:
        problems.add(f"policy {name!r} compresses every compression_interval={intervals[0]} decode steps, but the "
                     f"stream feeds {config.num_tokens - 1}: it would never compress (its figure would be the full "
                     "cache's); lower cache.compression_interval")
  problems.raise_if_any("lacache config")


def prefill_only_problem(name: str) -> str:
  return (f"policy {name!r} compresses only at a prefill hand-off (as kvpress's prefill presses), which streaming "
          "perplexity never has: it feeds one token at a time, so the figure would be the full cache's. Use "
          "cache.during_decode=True (the kvpress scorers evict at every step then), a decode-time wrapper (decoding, "
          "cam), or a decode-time policy (streaming, lacache, h2o, tova)")


def _compression_intervals(policy) -> list[int]:
  """The `compression_interval` of the policy and of every policy it is built from (Decoding, CaM)."""
  found = [policy.compression_interval] if isinstance(getattr(policy, "compression_interval", None), int) else []
  for field in dataclasses.fields(policy) if dataclasses.is_dataclass(policy) else ():
    part = getattr(policy, field.name)
    if isinstance(part, CachePolicy):
      found.extend(_compression_intervals(part))
  return found


def streaming_policies(cache) -> tuple[str, ...]:
  """The registered policies that compress while streaming under the `cache` section (and the full cache)."""
  names = []
  for name in registry.policy_names():
    try:
      policy = make_policy(name, cache)
    except ValueError:
      continue
    if not registry.POLICIES[name].budgeted or policy.compacts_in_decode:
      names.append(name)
  return tuple(names)


def _policy_unit(model, tokens: np.ndarray, name: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """One policy's streaming result, as stored in the run directory."""
  policy = make_policy(name, config.cache)
  steps = tokens.shape[1] - 1
  memory.require_cache_fits(policy, model.cfg, tokens.shape[0], policy.decode_capacity(model.cfg, steps),
                            what=f"policy {name!r}")
  result = perplexity.streaming_nll(model.params, model.cfg, tokens, policy, chunk=config.chunk,
                                    progress=rate_callback(config.num_tokens, name), mesh_rules=model.mesh_rules)
  nll = result.nll.mean(axis=0)
  bad = np.flatnonzero(~np.isfinite(nll))
  curve = result.running_ppl()
  figure = {
      "ppl": result.ppl, "ppl_at": {str(t): float(curve[t - 1]) for t in config.report_at if t <= curve.size},
      "tokens_per_second": result.tokens_per_second, "seconds": result.seconds,
      "compile_seconds": result.compile_seconds, "cache_slots": result.cache.capacity,
      "resident_kv_bytes": result.cache.nbytes(), "policy": repr(policy),
  }
  if bad.size or not math.isfinite(result.ppl):
    first = int(bad[0]) + 1 if bad.size else None
    figure["error"] = (f"non-finite NLL at {bad.size} of {nll.size} predicted tokens (first: token {first}); "
                       "the perplexity is not a measurement")
    logging.error("%s: %s", name, figure["error"])
  label = name if name == "full" else f"{name} ({policy.decode_capacity(model.cfg, config.num_tokens)} slots)"
  return {"figure": figure, "label": label, "curve": curve}


def _fmt(value: float, width: int) -> str:
  return f"{value:>{width}.3f}" if math.isfinite(value) else f"{'NON-FINITE':>{width}}"


def plot_running_ppl(curves: dict[str, np.ndarray], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, curve in curves.items():
    ax.plot(np.arange(1, curve.size + 1), curve, label=name)
  ax.set_xlabel("tokens streamed")
  ax.set_ylabel("running perplexity")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, run_dir: str | runs.RunDir, *, model=None) -> dict[str, Any]:
  """Streams the text under every policy of `config.policies`; one unit per policy in `run_dir`.

  `model`: an already loaded `lacax.weights.loader.Model` (the comparison job, which validates first); default
  `jobs.model_from_config(config)` after `validate(config)`.
  """
  if model is None:
    validate(config)
  run_dir = runs.as_run_dir(run_dir)
  model = model or jobs.model_from_config(config)
  if model.tokenizer is None:
    raise errors.ConfigError(f"model.path={config.model.path!r} ships no tokenizer; the streaming job needs one")
  ids = model.tokenizer.encode(load_text(config.data.path, config.data.field,
                                         encoding=config.data.get("encoding", "utf-8"), option="data"))
  if len(ids) < config.num_tokens + 1:
    raise errors.ConfigError(f"the text (data.path={config.data.path!r}) has {len(ids)} tokens; "
                             f"num_tokens={config.num_tokens} needs {config.num_tokens + 1}")
  tokens = np.asarray(ids[:config.num_tokens + 1], np.int32)[None]

  rows, curves, figures = [], {}, {}
  for name in config.policies:
    unit = run_dir.unit(f"policy-{name}", lambda name=name: _policy_unit(model, tokens, name, config))
    figure = unit["figure"]
    figure["ppl_at"] = {int(t): v for t, v in figure["ppl_at"].items()}
    curves[unit["label"]] = np.asarray(unit["curve"], np.float64)
    figures[name] = figure
    rows.append((name, figure["cache_slots"], figure["ppl"], figure["ppl_at"], figure["tokens_per_second"]))
    logging.info("%s: ppl %.3f, %.1f tok/s", name, figure["ppl"], figure["tokens_per_second"])

  marks_header = "".join(f"{'ppl@' + str(t):>12}" for t in config.report_at if t <= config.num_tokens)
  print(f"\nStreaming perplexity, {model.cfg.name} ({model.cfg.dtype}), {config.num_tokens} tokens, "
        f"cache budget {config.cache.size}")
  print(f"{'policy':<12}{'slots':>8}{'ppl':>12}{marks_header}{'tok/s':>9}")
  for name, slots, ppl, marks, speed in rows:
    print(f"{name:<12}{slots:>8}{_fmt(ppl, 12)}" + "".join(_fmt(v, 12) for v in marks.values()) + f"{speed:>9.1f}")
  for name, figure in figures.items():
    if "error" in figure:
      print(f"!!! {name}: {figure['error']}")
  plot_path = run_dir.file("running_ppl.png")
  plot_error = runs.safe_plot("running_ppl.png", plot_running_ppl, curves, plot_path,
                              f"{model.cfg.name}: streaming perplexity, budget {config.cache.size}")
  print(f"plot: {plot_path}" if plot_error is None else f"plot failed: {plot_error}")
  out = {"figures": figures, "num_tokens": config.num_tokens, "model": model.cfg.name,
         "running_ppl": {k: v.tolist() for k, v in curves.items()}, "model_fingerprint": model.fingerprint()}
  if plot_error is not None:
    out["plot_errors"] = {"running_ppl.png": plot_error}
  return out
