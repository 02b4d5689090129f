"""RULER: the 13 synthetic long-context tasks at several lengths, per cache policy, with the official scoring.

The suite of NVIDIA/RULER (`scripts/synthetic.yaml`), generated offline by `lacax.eval.ruler` and run through
the one-shot cache protocol of the other evaluations (`lacax.eval.oneshot`):

  1. every (task, length) holds `num_samples` prompts (seeded; the prompt plus the task's tokens_to_generate fit
     in `length` tokens of the model), rendered as RULER's template + answer prefix (`chat=True`: the
     tokenizer's chat template around the input, the answer prefix after it, as RULER's model templates do);
  2. full-attention prefill, one compaction to C = int(cache.budget * prompt tokens) per policy, greedy decode
     of the task's tokens_to_generate (128 NIAH, 30 vt, 120 cwe, 50 fwe, 32 QA) compacting after every token,
     stopping at the tokenizer's stop ids;
  3. RULER's scores: string_match_all (NIAH, vt, cwe, fwe) or string_match_part (QA) over the task's samples,
     x100; per length the unweighted mean over tasks, and the mean over lengths.

Writes a table per policy (tasks x lengths), `results.json` (every score and every sample's prediction) and
`ruler.png` (mean score against length, one line per policy). Each (task, length) is a unit of the run
directory (`lacax.runs`) holding every policy's predictions; a resumed run skips the finished ones.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from lacax import jobs
from lacax import errors
from lacax import runs
from lacax.cache import registry
from lacax.cache.base import CachePolicy
from lacax.eval import oneshot
from lacax.eval import ruler
from lacax.eval.needle_grid import length_label
from lacax.eval.texts import load_text
from lacax.progress import ProgressBar


def _field_problems(config: ml_collections.ConfigDict) -> list[str]:
  problems = errors.Problems()
  tasks = tuple(config.tasks)
  problems.check(len(tasks) > 0, f"tasks is empty: expected names from {list(ruler.TASKS)}")
  for task in tasks:
    problems.check(task in ruler.TASKS, f"tasks contains {task!r}; expected names from {list(ruler.TASKS)}")
  problems.check(len(set(tasks)) == len(tasks), f"tasks={tasks!r} has duplicates")
  lengths = tuple(config.lengths)
  problems.check(len(lengths) > 0 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths),
                 f"lengths={lengths!r} must be a non-empty tuple of positive token counts")
  problems.check(len(set(lengths)) == len(lengths), f"lengths={lengths!r} has duplicates")
  problems.check(isinstance(config.num_samples, int) and config.num_samples >= 1,
                 f"num_samples={config.num_samples!r} must be an int >= 1")
  problems.check(isinstance(config.seed, int), f"seed={config.seed!r} must be an int")
  problems.extend(oneshot.oneshot_field_problems(config, budget_of="the prompt"))
  return problems.messages


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the job reads; one `ValidationError` lists every problem (field, value, constraint)."""
  problems = errors.Problems()
  problems.extend(_field_problems(config))
  problems.raise_if_any(f"{config.experiment} config")


def validate(config: ml_collections.ConfigDict) -> None:
  """`validate_config`, plus the haystack text, the model path, every length against the model's context and
  every policy against the model's shape: all before the model is loaded."""
  oneshot.validate_before_loading(config, _field_problems(config), lengths_field="lengths", lengths=config.lengths)


def renderer(tokenizer, chat: bool):
  """(input, answer prefix) -> ids: RULER's 'base' template (the text as is, the tokenizer's BOS rule), or the
  chat template around the input with the answer prefix after it (RULER's model templates)."""
  if not chat:
    return lambda text, prefix: tokenizer.encode(text + prefix)
  if not tokenizer.has_chat_template:
    raise errors.ConfigError("chat=True but the model's tokenizer has no chat template; set --config.chat=False")

  def render(text: str, prefix: str) -> list[int]:
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(wrapped + prefix, add_bos=False)

  return render


def _unit_key(task: str, length: int) -> str:
  return f"ruler-{task}-L{length}"


def run_cell(model, samples: Sequence[ruler.RulerSample], config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every policy's predictions for one (task, length): the unit stored in the run directory."""
  tok = model.tokenizer
  names = tuple(config.policies)

  def policies_for(i: int) -> dict[str, CachePolicy]:
    return {name: registry.make_prefill_policy(name, config.cache, model.cfg, prompt_len=len(samples[i].ids),
                                               protocol="niah") for name in names}

  group = oneshot.generate_group(model, [s.ids for s in samples], policies_for, batch_size=config.batch_size,
                                 max_new_tokens=lambda rows: max(samples[i].new_tokens for i in rows),
                                 stop_ids=tok.stop_ids, names=names)
  return {"predictions": {name: [tok.decode(ids, skip_special_tokens=True) for ids in group["outputs"][name]]
                          for name in names},
          "decode_tokens": {name: sum(len(ids) for ids in group["outputs"][name]) for name in names},
          "decode_seconds": group["decode_seconds"], "prefill_seconds": group["prefill_seconds"],
          "prompt_tokens": group["prompt_tokens"]}


def format_table(name: str, scores: dict[str, dict[int, float]], lengths: Sequence[int]) -> str:
  """Tasks x lengths of one policy's scores, with the per-length task means and the overall mean."""
  lines = [f"{name}", f"{'task':<18}" + "".join(f"{length_label(n):>8}" for n in lengths)]
  for task, row in scores.items():
    lines.append(f"{task:<18}" + "".join(f"{row[n]:>8.1f}" for n in lengths))
  means = [np.mean([row[n] for row in scores.values()]) for n in lengths]
  lines.append(f"{'mean':<18}" + "".join(f"{m:>8.1f}" for m in means) + f"   overall {np.mean(means):.1f}")
  return "\n".join(lines)


def plot_scores(by_length: dict[str, list[float]], lengths: Sequence[int], path: str, title: str) -> None:
  """Mean RULER score against context length, one line per policy."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, values in by_length.items():
    ax.plot(range(len(lengths)), values, marker="o", label=name)
  ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("RULER score (mean over tasks)")
  ax.set_ylim(-2, 102)
  ax.grid(True, alpha=0.3)
  ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, run_dir: str | runs.RunDir, *, model=None) -> dict[str, Any]:
  """Generates, runs and scores every (task, length) under every policy; prints the tables, writes `ruler.png`.

  Args:
    config: a `configs/ruler.py` config.
    run_dir: the run directory (units, the plot; the launcher writes config.json and results.json there).
    model: an already loaded `lacax.weights.loader.Model` (tests, the comparison job); default
      `load_model(config.model.path)`.
  """
  if model is None:
    validate(config)
  else:
    validate_config(config)
  run_dir = runs.as_run_dir(run_dir)
  model = model or jobs.model_from_config(config)
  tok = model.tokenizer
  if tok is None:
    raise errors.ConfigError(f"model.path={config.model.path!r} ships no tokenizer; the RULER job needs one")
  render = renderer(tok, config.chat)
  text = load_text(config.haystack.path, config.haystack.field, encoding=config.haystack.get("encoding", "utf-8"),
                   option="haystack")
  tasks, lengths, names = tuple(config.tasks), tuple(config.lengths), tuple(config.policies)
  scores = {name: {task: {} for task in tasks} for name in names}
  records = []
  decode_tokens = {name: 0 for name in names}
  decode_seconds = {name: 0.0 for name in names}
  prefill_seconds, prompt_tokens = 0.0, 0
  with ProgressBar(len(tasks) * len(lengths) * config.num_samples, f"ruler ({len(names)} policies)",
                   unit="prompt") as bar:
    for length in lengths:
      for task in tasks:
        start = time.perf_counter()
        try:
          samples = ruler.generate(task, length, config.num_samples, render, seed=config.seed, text=text)
        except ValueError as e:
          raise errors.ConfigError(f"lengths contains {length}: {e}") from None
        logging.info("ruler %s at %d: %d prompts built in %.1fs", task, length, len(samples),
                     time.perf_counter() - start)
        cell = run_dir.unit(_unit_key(task, length), lambda samples=samples: run_cell(model, samples, config))
        prefill_seconds += cell["prefill_seconds"]
        prompt_tokens += cell["prompt_tokens"]
        metric = ruler.metric_of(task)
        refs = [list(s.outputs) for s in samples]
        for name in names:
          preds = cell["predictions"][name]
          scores[name][task][length] = ruler.score_task(metric, preds, refs)
          decode_tokens[name] += cell["decode_tokens"][name]
          decode_seconds[name] += cell["decode_seconds"][name]
        for i, s in enumerate(samples):
          records.append({"task": task, "length": length, "index": s.index, "prompt_tokens": len(s.ids),
                          "outputs": list(s.outputs), "predictions": {
                              name: {"text": cell["predictions"][name][i],
                                     "score": ruler.sample_match(cell["predictions"][name][i], s.outputs, metric)}
                              for name in names}})
        bar.advance(len(samples), postfix=f"{task} @ {length_label(length)}")

  figures, by_length = {}, {}
  print(f"\nRULER: {model.cfg.name}, {config.num_samples} samples per task and length, budget {config.cache.budget} "
        "of the prompt, score (0-100) per task x length")
  for name in names:
    by_length[name] = [float(np.mean([scores[name][t][n] for t in tasks])) for n in lengths]
    figures[name] = {
        "scores": {t: {str(n): v for n, v in row.items()} for t, row in scores[name].items()},
        "by_length": dict(zip(map(str, lengths), by_length[name])), "mean": float(np.mean(by_length[name])),
        "decode_seconds": decode_seconds[name], "decode_tokens": decode_tokens[name],
        "decode_tokens_per_second": decode_tokens[name] / max(decode_seconds[name], 1e-9),
    }
    print("\n" + format_table(name, scores[name], lengths))
  print("\n" + f"{'policy':<12}{'mean':>8}" + "".join(f"{length_label(n):>8}" for n in lengths) + f"{'dec tok/s':>11}")
  for name in names:
    print(f"{name:<12}{figures[name]['mean']:>8.1f}" + "".join(f"{v:>8.1f}" for v in by_length[name]) +
          f"{figures[name]['decode_tokens_per_second']:>11.1f}")
  out = {"figures": figures, "tasks": list(tasks), "lengths": list(lengths), "model": model.cfg.name,
         "samples": records, "prefill_seconds": prefill_seconds,
         "prefill_tokens_per_second": prompt_tokens / max(prefill_seconds, 1e-9),
         "model_fingerprint": model.fingerprint()}
  plot_path = run_dir.file("ruler.png")
  plot_error = runs.safe_plot("ruler.png", plot_scores, by_length, lengths, plot_path,
                              f"RULER: {model.cfg.name}, budget {config.cache.budget}")
  print(f"plot: {plot_path}" if plot_error is None else f"plot failed: {plot_error}")
  if plot_error is not None:
    out["plot_errors"] = {"ruler.png": plot_error}
  return out
