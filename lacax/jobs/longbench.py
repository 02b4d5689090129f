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
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import ml_collections

from lacax.cache import registry
from lacax.cache.base import CachePolicy
from lacax.eval import longbench as lb
from lacax.jobs.passkey import (batches_by_policy, input_ids_fn, oneshot_generate, progress_bar,
                                validate_oneshot_fields)

DATA_HELP = ("LongBench data is not bundled with lacax and cannot be fetched offline. Download the official "
             "data.zip (https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip), unzip it (it holds "
             "data/<task>.jsonl and, for LongBench-E, data/<task>_e.jsonl, one JSON object per line with input, "
             "context, answers, length, dataset, language, all_classes and _id), then pass "
             "--config.data.path=/path/to/data (the folder, or one <task>.jsonl file).")


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the job reads (not the data path, which `load_data` checks); messages name the field."""
  _check(isinstance(config.max_length, int) and config.max_length >= 2,
         f"max_length={config.max_length!r} must be an int >= 2 (the model's model2maxlen entry, e.g. 3500)")
  for task in config.tasks:
    _check(task in lb.MAX_NEW_TOKENS, f"tasks contains {task!r}; expected LongBench tasks from {list(lb.TASKS)}")
  if config.data.longbench_e:
    for task in config.tasks:
      _check(task in lb.LONGBENCH_E_TASKS,
             f"tasks contains {task!r}, which LongBench-E (data.longbench_e=True) does not have; expected one of "
             f"{list(lb.LONGBENCH_E_TASKS)}")
  _check(isinstance(config.max_examples, int) and config.max_examples >= 0,
         f"max_examples={config.max_examples!r} must be an int >= 0 (0 = every example)")
  validate_oneshot_fields(config, budget_of="max_length")


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
  return input_ids_fn(tokenizer, chat and lb.uses_chat_template(task))(prompt)


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


def run(config: ml_collections.ConfigDict, run_dir: str, *, model=None) -> dict[str, Any]:
  """Predicts and scores every task for every policy; prints the table and returns the figures.

  Args:
    config: a `configs/longbench.py` config.
    run_dir: where `pred/<policy>/<task>.jsonl` go (the launcher writes config.json and results.json there).
    model: an already loaded `lacax.weights.loader.Model` (tests); default `load_model(config.model.path)`.
  """
  from lacax.weights.loader import load_model  # pylint: disable=g-import-not-at-top

  validate_config(config)
  data = load_data(config)
  model = model or load_model(config.model.path or None, dtype=config.model.dtype)
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"model.path={config.model.path!r} ships no tokenizer; the LongBench job needs one")
  if config.max_length > model.cfg.max_position_embeddings:
    logging.warning("max_length=%d exceeds the model's trained context %d", config.max_length,
                    model.cfg.max_position_embeddings)
  policies = tuple(config.policies)
  records: dict[str, dict[str, list[lb.PredictionRecord]]] = {p: {} for p in policies}
  seconds = {p: 0.0 for p in policies}
  prefill_seconds, prompt_tokens = 0.0, 0
  bar = progress_bar(sum(len(v) for v in data.values()), f"longbench ({len(policies)} policies)", unit="example")
  for task, examples in data.items():
    inputs = [build_input(task, ex, tok, max_length=config.max_length, chat=config.chat) for ex in examples]

    def policies_for(i: int, task=task, inputs=inputs) -> dict[str, CachePolicy]:
      del task
      return {name: registry.make_prefill_policy(name, config.cache, model.cfg, prompt_len=len(inputs[i]),
                                                 protocol="longbench", model_max_len=config.max_length)
              for name in policies}

    preds: dict[str, dict[int, str]] = {p: {} for p in policies}
    for members, batch_policies in batches_by_policy(range(len(examples)), policies_for, config.batch_size):
      result = oneshot_generate(model.params, model.cfg, [inputs[i] for i in members], batch_policies,
                                max_new_tokens=lb.MAX_NEW_TOKENS[task], stop_ids=stop_ids_for(task, tok))
      prefill_seconds += result.prefill_seconds
      prompt_tokens += result.prompt_tokens
      for name in policies:
        seconds[name] += result.decode_seconds[name]
        for row, i in enumerate(members):
          preds[name][i] = tok.decode(result.tokens[name][row], skip_special_tokens=True).strip()
      if bar is not None:
        bar.update(len(members))
        bar.set_postfix_str(f"{task}, prefill {prompt_tokens / max(prefill_seconds, 1e-9):.0f} tok/s")
    for name in policies:
      records[name][task] = [lb.PredictionRecord(pred=preds[name][i], answers=ex.answers, all_classes=ex.all_classes,
                                                 length=ex.length) for i, ex in enumerate(examples)]
      _write_predictions(os.path.join(run_dir, "pred", name, f"{task}.jsonl"), records[name][task])
  if bar is not None:
    bar.close()

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
  """One official-format prediction file (pred, answers, all_classes, length per line)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      json.dump({"pred": r.pred, "answers": list(r.answers),
                 "all_classes": None if r.all_classes is None else list(r.all_classes), "length": r.length},
                f, ensure_ascii=False)
      f.write("\n")
