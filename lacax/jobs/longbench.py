"""LongBench (v1 / LongBench-E) predictions and official scores, per cache policy.

The pipeline of THUDM/LongBench `pred.py` as GATECH-EIC/LaCache runs it (`LongBench/pred.py`, `eval.py`):

  1. prompt = the task's template filled with the example (`lacax.eval.longbench.build_prompt`);
  2. middle truncation to `max_length` tokens (the model's entry in `config/model2maxlen.json`: first and last
     max_length / 2 tokens, decoded back to text);
  3. the model's chat template, except for trec, triviaqa, samsum, lsht, lcc and repobench-p (`chat=True`);
  4. full-attention prefill, one compaction to the policy's budget, greedy decode of at most
     `MAX_NEW_TOKENS[task]` tokens compacting after every token; stop at the tokenizer's stop ids (and at "\\n"
     for samsum, as officially); the prediction is the decoded text, stripped;
  5. the official metric per task, x100, and the unweighted average over tasks (`score_longbench`).

The budget is the reference's: C = int(budget * max_length) tokens for every compacting policy (a fraction of
the model's maximum length, not of the prompt; shorter prompts are not compressed). LaCache is
`LadderPolicy.for_prefill(protocol="longbench")` (sinks min(128, P - N - 1, C - N - 1)); StreamingLLM keeps
`cache.start_size` sinks + C - start_size recent tokens.

Writes the table (tasks x policies), `results.json`, and the predictions in the official format
(`pred/<policy>/<task>.jsonl`: pred, answers, all_classes, length) so the official `eval.py` can re-score them.

LongBench data is not bundled: `data.path` must point at the official JSONL files (see `load_data`).

Each (task, policy) is a unit of the run directory (`lacax.runs`): its predictions are written when the task
finishes, and a resumed run generates only the (task, policy) pairs that are missing.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import ml_collections

from lacax import errors
from lacax import io as lacax_io
from lacax import jobs
from lacax import runs
from lacax.cache import registry
from lacax.cache.base import CachePolicy
from lacax.eval import longbench as lb
from lacax.eval import oneshot
from lacax.progress import ProgressBar
from lacax.tokenizer import prompt_encoder
from lacax.weights import loader

DATA_HELP = ("LongBench data is not bundled with lacax and cannot be fetched offline. Download the official "
             "data.zip (https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip), unzip it (it holds "
             "data/<task>.jsonl and, for LongBench-E, data/<task>_e.jsonl, one JSON object per line with input, "
             "context, answers, length, dataset, language, all_classes and _id), then pass "
             "--config.data.path=/path/to/data (the folder, or one <task>.jsonl file).")


def _field_problems(config: ml_collections.ConfigDict) -> list[str]:
  problems = errors.Problems()
  problems.check(isinstance(config.max_length, int) and config.max_length >= 2,
                 f"max_length={config.max_length!r} must be an int >= 2 (the model's model2maxlen entry, e.g. 3500)")
  for task in config.tasks:
    problems.check(task in lb.MAX_NEW_TOKENS, f"tasks contains {task!r}; expected LongBench tasks from {list(lb.TASKS)}")
  if config.data.longbench_e:
    for task in config.tasks:
      problems.check(task in lb.LONGBENCH_E_TASKS,
                     f"tasks contains {task!r}, which LongBench-E (data.longbench_e=True) does not have; expected "
                     f"one of {list(lb.LONGBENCH_E_TASKS)}")
  problems.check(isinstance(config.max_examples, int) and config.max_examples >= 0,
                 f"max_examples={config.max_examples!r} must be an int >= 0 (0 = every example)")
  problems.extend(oneshot.oneshot_field_problems(config, budget_of="max_length"))
  return problems.messages


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the job reads (not the data, which `validate` checks); one error lists every problem."""
  problems = errors.Problems()
  problems.extend(_field_problems(config))
  problems.raise_if_any("longbench config")


def validate(config: ml_collections.ConfigDict) -> None:
  """`validate_config`, plus every task file (present, readable, well-formed, not empty), the model path,
  max_length against the model's context and every policy against the model: before the model is loaded."""
  problems = errors.Problems()
  problems.extend(_field_problems(config))
  try:
    data = load_data(config)
  except (FileNotFoundError, ValueError) as e:  # lb.LongBenchFormatError is a ValueError
    problems.add(str(e))
  else:
    for task, examples in data.items():
      problems.check(len(examples) > 0, f"the {task} file in data.path={config.data.path!r} holds no examples")
  model_problems = loader.model_path_problems(config.model.path, "model.path")
  problems.extend(model_problems)
  if not problems:
    cfg = loader.read_model_config(config.model.path or None, dtype=config.model.dtype)
    longest = config.max_length + max(lb.MAX_NEW_TOKENS[t] for t in data)
    problems.check(longest <= cfg.max_position_embeddings,
                   f"max_length={config.max_length} + up to {longest - config.max_length} new tokens exceeds the "
                   f"context of {cfg.name} (max_position_embeddings={cfg.max_position_embeddings})")
    problems.extend(oneshot.policy_problems(config, cfg, [config.max_length], protocol="longbench",
                                            model_max_len=config.max_length))
  problems.raise_if_any("longbench config")


def load_data(config: ml_collections.ConfigDict) -> dict[str, list[lb.LongBenchExample]]:
  """The examples to run: {task: examples[:max_examples]}.

  Raises:
    FileNotFoundError: `data.path` is empty or missing (the message says where LongBench JSONL comes from).
  """
  path = config.data.path
  if not path:
    raise FileNotFoundError(f"data.path is empty: expected the LongBench JSONL folder or file. {DATA_HELP}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.path={path!r} does not exist. {DATA_HELP}")
  data = lb.load_longbench(path, tasks=tuple(config.tasks) or None, longbench_e=config.data.longbench_e)
  if config.max_examples:
    data = {task: examples[:config.max_examples] for task, examples in data.items()}
  return data


def build_input(task: str, example: lb.LongBenchExample, tokenizer, *, max_length: int, chat: bool) -> list[int]:
  """The token ids the model sees: template -> middle truncation to max_length -> chat template (chat tasks)."""
  prompt = lb.build_prompt(task, example)
  prompt = lb.truncate_prompt(prompt, max_length, tokenizer.encode,
                              lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
  return prompt_encoder(tokenizer, chat and lb.uses_chat_template(task))(prompt)


def stop_ids_for(task: str, tokenizer) -> tuple[int, ...]:
  """The tokenizer's stop ids, plus the newline token for samsum (the official pred.py's guard against the
  model repeating "\\nDialogue" forever)."""
  stops = list(tokenizer.stop_ids)
  if task == "samsum":
    newline = tokenizer.encode("\n", add_bos=False)
    if newline:
      stops.append(newline[-1])
  return tuple(dict.fromkeys(stops))


def _format_table(scores: dict[str, dict[str, Any]], policies: Sequence[str], longbench_e: bool) -> str:
  rows: list[tuple[str, list[float]]] = []
  first = scores[policies[0]]
  for task in first:
    if longbench_e:
      for bucket in lb.LENGTH_BUCKETS:
        rows.append((f"{task} {bucket}", [scores[p][task][bucket] for p in policies]))
    else:
      rows.append((task, [scores[p][task] for p in policies]))
  width = max(14, max(len(r[0]) for r in rows) + 2)
  lines = [f"{'task':<{width}}" + "".join(f"{p:>12}" for p in policies)]
  lines += [f"{name:<{width}}" + "".join(f"{v:>12.2f}" for v in values) for name, values in rows]
  return "\n".join(lines)


def _unit_key(task: str, policy: str) -> str:
  return f"longbench-{task}-{policy}"


def _generate_task(model, task: str, examples, config, policies: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Predictions of every example of `task` under `policies` (one shared prefill per batch): one unit each."""
  tok = model.tokenizer
  inputs = [build_input(task, ex, tok, max_length=config.max_length, chat=config.chat) for ex in examples]

  def policies_for(i: int) -> dict[str, CachePolicy]:
    return {name: registry.make_prefill_policy(name, config.cache, model.cfg, prompt_len=len(inputs[i]),
                                               protocol="longbench", model_max_len=config.max_length)
            for name in policies}

  group = oneshot.generate_group(model, inputs, policies_for, batch_size=config.batch_size,
                                 max_new_tokens=lambda rows: lb.MAX_NEW_TOKENS[task],
                                 stop_ids=stop_ids_for(task, tok), names=tuple(policies))
  stamp = f"{time.time():.6f}"  # identifies the units that shared this prefill
  return {name: {"preds": [tok.decode(ids, skip_special_tokens=True).strip() for ids in group["outputs"][name]],
                 "decode_seconds": group["decode_seconds"][name], "prefill_seconds": group["prefill_seconds"],
                 "prompt_tokens": group["prompt_tokens"], "prefill_group": stamp} for name in policies}


def run(config: ml_collections.ConfigDict, run_dir: str | runs.RunDir, *, model=None) -> dict[str, Any]:
  """Predicts and scores every task for every policy; prints the table and returns the figures.

  Args:
    config: a `configs/longbench.py` config.
    run_dir: the run directory: units, `pred/<policy>/<task>.jsonl` (the launcher writes config.json and
      results.json there).
    model: an already loaded `lacax.weights.loader.Model` (tests); default `load_model(config.model.path)`.
  """
  if model is None:
    validate(config)
  else:
    validate_config(config)
  run_dir = runs.as_run_dir(run_dir)
  data = load_data(config)
  model = model or jobs.model_from_config(config)
  tok = model.tokenizer
  if tok is None:
    raise errors.ConfigError(f"model.path={config.model.path!r} ships no tokenizer; the LongBench job needs one")
  if config.max_length > model.cfg.max_position_embeddings:
    logging.warning("max_length=%d exceeds the model's trained context %d", config.max_length,
                    model.cfg.max_position_embeddings)
  policies = tuple(config.policies)
  records: dict[str, dict[str, list[lb.PredictionRecord]]] = {p: {} for p in policies}
  seconds = {p: 0.0 for p in policies}
  prefill: dict[str, tuple[float, int]] = {}
  with ProgressBar(sum(len(v) for v in data.values()), f"longbench ({len(policies)} policies)",
                   unit="example") as bar:
    for task, examples in data.items():
      units = {name: run_dir.load_unit(_unit_key(task, name)) for name in policies}
      missing = [name for name in policies if units[name] is None]
      if missing:
        for name, unit in _generate_task(model, task, examples, config, missing).items():
          run_dir.save_unit(_unit_key(task, name), unit)
          units[name] = run_dir.load_unit(_unit_key(task, name))
      for name in policies:
        unit = units[name]
        seconds[name] += unit["decode_seconds"]
        prefill[unit["prefill_group"]] = (unit["prefill_seconds"], unit["prompt_tokens"])
        records[name][task] = [lb.PredictionRecord(pred=pred, answers=ex.answers, all_classes=ex.all_classes,
                                                   length=ex.length) for pred, ex in zip(unit["preds"], examples)]
        _write_predictions(run_dir.file("pred", name, f"{task}.jsonl"), records[name][task])
      prefill_seconds = sum(s for s, _ in prefill.values())
      prompt_tokens = sum(n for _, n in prefill.values())
      bar.advance(len(examples), postfix=f"{task}, prefill {prompt_tokens / max(prefill_seconds, 1e-9):.0f} tok/s")
  prefill_seconds = sum(s for s, _ in prefill.values())
  prompt_tokens = sum(n for _, n in prefill.values())

  longbench_e = bool(config.data.longbench_e)
  scores = {name: lb.score_longbench(records[name], longbench_e=longbench_e) for name in policies}
  budget_tokens = registry.prefill_budget(config.cache, prompt_len=1, protocol="longbench",
                                         model_max_len=config.max_length)
  print(f"\nLongBench{'-E' if longbench_e else ''}, {model.cfg.name}, max_length {config.max_length}, cache "
        f"budget {config.cache.budget} x max_length = {budget_tokens} tokens, {sum(map(len, data.values()))} examples")
  print(_format_table(scores, policies, longbench_e))
  figures = {name: {"scores": scores[name], "decode_seconds": seconds[name],
                    "examples": {task: len(r) for task, r in records[name].items()}} for name in policies}
  return {"figures": figures, "model": model.cfg.name, "max_length": config.max_length,
          "tasks": list(data), "prefill_seconds": prefill_seconds,
          "prefill_tokens_per_second": prompt_tokens / max(prefill_seconds, 1e-9),
          "model_fingerprint": model.fingerprint()}


def _write_predictions(path: str, records: Sequence[lb.PredictionRecord]) -> None:
  """One official-format prediction file (pred, answers, all_classes, length per line), written atomically."""
  lines = [lacax_io.dumps({"pred": r.pred, "answers": list(r.answers),
                           "all_classes": None if r.all_classes is None else list(r.all_classes),
                           "length": r.length}, indent=None) for r in records]
  lacax_io.atomic_write_text(path, "".join(line + "\n" for line in lines))
