"""The main job: token-by-token streaming perplexity of the full cache, StreamingLLM and LaCache.

The protocol of the LaCache and StreamingLLM papers (`ppl/run.py`, `examples/eval_long_ppl.py`): feed the text
one token at a time from an empty cache, take the NLL of the next token, compact after every step; PPL =
exp(mean NLL). Every policy runs as one compiled scan (compiled once, then no Python per token) at the same
cache budget. Writes a table (stdout), `results.json` and a plot of running perplexity against tokens.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections
import numpy as np

from lacax.cache.registry import make_policy
from lacax.eval import perplexity
from lacax.eval.texts import load_text
from lacax.weights.loader import load_model


def _progress_bar(total: int, desc: str):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  bar = tqdm(total=total, desc=desc, unit="tok", dynamic_ncols=True, mininterval=1.0)

  def update(done: int, seconds: float):
    bar.update(done - bar.n)
    bar.set_postfix_str(f"{done / max(seconds, 1e-9):.1f} tok/s")
    if done >= total:
      bar.close()

  return update


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


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  if config.num_tokens < 2:
    raise ValueError(f"num_tokens={config.num_tokens} must be >= 2")
  model = load_model(config.model.path or None, dtype=config.model.dtype)
  if model.tokenizer is None:
    raise ValueError(f"model.path={config.model.path!r} ships no tokenizer; the streaming job needs one")
  ids = model.tokenizer.encode(load_text(config.data.path, config.data.field))
  if len(ids) < config.num_tokens + 1:
    raise ValueError(f"the text has {len(ids)} tokens; num_tokens={config.num_tokens} needs {config.num_tokens + 1}")
  tokens = np.asarray(ids[:config.num_tokens + 1], np.int32)[None]

  rows, curves, figures = [], {}, {}
  for name in config.policies:
    policy = make_policy(name, config.cache)
    result = perplexity.streaming_nll(model.params, model.cfg, tokens, policy, chunk=config.chunk,
                                      progress=_progress_bar(config.num_tokens, name))
    curve = result.running_ppl()
    marks = {int(t): float(curve[t - 1]) for t in config.report_at if t <= curve.size}
    label = name if name == "full" else f"{name} ({policy.decode_capacity(model.cfg, config.num_tokens)} slots)"
    curves[label] = curve
    figures[name] = {
        "ppl": result.ppl, "ppl_at": marks, "tokens_per_second": result.tokens_per_second,
        "seconds": result.seconds, "compile_seconds": result.compile_seconds,
        "cache_slots": result.cache.capacity, "resident_kv_bytes": result.cache.nbytes(),
        "policy": repr(policy),
    }
    rows.append((name, result.cache.capacity, result.ppl, marks, result.tokens_per_second))
    logging.info("%s: ppl %.3f, %.1f tok/s", name, result.ppl, result.tokens_per_second)

  marks_header = "".join(f"{'ppl@' + str(t):>12}" for t in config.report_at if t <= config.num_tokens)
  print(f"\nStreaming perplexity, {model.cfg.name} ({model.cfg.dtype}), {config.num_tokens} tokens, "
        f"cache budget {config.cache.size}")
  print(f"{'policy':<12}{'slots':>8}{'ppl':>10}{marks_header}{'tok/s':>9}")
  for name, slots, ppl, marks, speed in rows:
    print(f"{name:<12}{slots:>8}{ppl:>10.3f}" + "".join(f"{v:>12.3f}" for v in marks.values()) + f"{speed:>9.1f}")
  plot_path = os.path.join(run_dir, "running_ppl.png")
  plot_running_ppl(curves, plot_path, f"{model.cfg.name}: streaming perplexity, budget {config.cache.size}")
  print(f"plot: {plot_path}")
  return {"figures": figures, "num_tokens": config.num_tokens, "model": model.cfg.name,
          "running_ppl": {k: v.tolist() for k, v in curves.items()}, "model_fingerprint": model.fingerprint()}
