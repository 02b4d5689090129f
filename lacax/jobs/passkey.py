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
           `config.needle`. `grid.protocol="kvpress"` builds the prompt as kvpress's needle_in_haystack
           benchmark does (`lacax.eval.needle_grid.kvpress_niah_sample`: the haystack cut to length - needle -
           150 tokens, the needle inserted at a token index, the "story book" wrapper) and records kvpress's
           ROUGE score against the needle beside the pass rate.

The library parts live in `lacax.eval.needle_grid` (the grid, scores, tables, heatmaps), `lacax.eval.oneshot`
and `lacax.generate.oneshot_generate` (one prefill per group of policies that read the cache alike); this job
composes them. Each cell (length x depth, every policy) is a unit of the run directory (`lacax.runs`), written
as it finishes; a resumed run skips the finished cells.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ml_collections
import numpy as np

from lacax import errors
from lacax import jobs
from lacax import runs
from lacax.cache import registry
from lacax.cache.base import CachePolicy
from lacax.eval import needle_grid as ng
from lacax.eval import oneshot
from lacax.eval import passkey as pk
from lacax.eval.longbench.metrics import rouge_l_f1
from lacax.eval.texts import load_text
from lacax.progress import ProgressBar
from lacax.tokenizer import prompt_encoder

TASKS = ng.TASKS
NIAH_DEFAULTS = ng.NIAH_DEFAULTS


def _field_problems(config: ml_collections.ConfigDict) -> list[str]:
  problems = errors.Problems()
  problems.check(config.task in TASKS, f"task={config.task!r} must be one of {list(TASKS)}")
  grid = config.grid
  lengths = tuple(grid.lengths)
  problems.check(len(lengths) > 0 and all(isinstance(n, int) and n > 0 for n in lengths),
                 f"grid.lengths={lengths!r} must be a non-empty tuple of positive token counts")
  problems.check(len(set(lengths)) == len(lengths), f"grid.lengths={lengths!r} has duplicates")
  depths = tuple(grid.depths)
  problems.check(len(depths) > 0 and all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in depths),
                 f"grid.depths={depths!r} must be a non-empty tuple of fractions in [0, 1]")
  problems.check(len(set(depths)) == len(depths), f"grid.depths={depths!r} has duplicates")
  problems.check(isinstance(grid.samples_per_cell, int) and grid.samples_per_cell >= 1,
                 f"grid.samples_per_cell={grid.samples_per_cell!r} must be an int >= 1")
  problems.check(grid.depth_unit in pk.DEPTH_UNITS,
                 f"grid.depth_unit={grid.depth_unit!r} must be one of {pk.DEPTH_UNITS}")
  problems.check(grid.suffix_mode in pk.SUFFIX_MODES,
                 f"grid.suffix_mode={grid.suffix_mode!r} must be one of {pk.SUFFIX_MODES}")
  problems.check(isinstance(config.extra_new_tokens, int) and config.extra_new_tokens >= 0,
                 f"extra_new_tokens={config.extra_new_tokens!r} must be an int >= 0")
  problems.extend(oneshot.oneshot_field_problems(config, budget_of="the prompt"))
  protocol = grid.get("protocol", "lacache")
  problems.check(protocol in ng.PROTOCOLS, f"grid.protocol={protocol!r} must be one of {list(ng.PROTOCOLS)}")
  problems.check(protocol == "lacache" or config.task == "niah",
                 f"grid.protocol={protocol!r} applies to task 'niah' only (task={config.task!r})")
  if config.task == "niah":
    problems.check("{answer}" in config.needle.template,
                   f"needle.template={config.needle.template!r} must contain '{{answer}}'")
    problems.check(isinstance(config.needle.digits, int) and 1 <= config.needle.digits <= 18,
                   f"needle.digits={config.needle.digits!r} must be an int in [1, 18]")
  return problems.messages


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the job reads; one `ValidationError` lists every problem (field, value, constraint)."""
  problems = errors.Problems()
  problems.extend(_field_problems(config))
  problems.raise_if_any(f"{config.experiment} config")


def validate(config: ml_collections.ConfigDict) -> None:
  """`validate_config`, plus the haystack file, the model path, every grid length against the model's context
  and every policy against the model's shape: all before the model is loaded, in one `ValidationError`."""
  answer_room = (int(config.needle.digits) if config.task == "niah" else 5) + config.extra_new_tokens + 2
  oneshot.validate_before_loading(config, _field_problems(config), lengths_field="grid.lengths",
                                  lengths=config.grid.lengths, answer_room=answer_room,
                                  haystack=config.task == "niah")


def _policies_for(config, cfg, prompt_len: int) -> dict[str, CachePolicy]:
  return {name: registry.make_prefill_policy(name, config.cache, cfg, prompt_len=prompt_len, protocol="niah")
          for name in config.policies}


def generate_grid(model, grid, config: ml_collections.ConfigDict, run_dir: runs.RunDir | None = None
                  ) -> tuple[dict[str, list[list[int]]], dict[str, Any]]:
  """Generates every grid prompt under every policy of `config.policies`, one cell (a unit of `run_dir`) at a
  time, batching a cell's prompts that get the same policies.

  Returns:
    ({policy: generated ids per grid sample, in grid order}, timings: prefill seconds and tokens/s, decode
    seconds per policy).
  """
  outputs: dict[str, list[list[int]]] = {name: [[] for _ in grid] for name in config.policies}
  prefill_seconds, prefill_tokens = 0.0, 0
  decode_seconds = {name: 0.0 for name in config.policies}
  cells = ng.cells(grid)
  with ProgressBar(len(grid), f"{config.task} ({len(config.policies)} policies)", unit="prompt") as bar:
    for (length, depth), members in cells.items():
      def compute(members=members):
        return oneshot.generate_group(
            model, [grid[i].ids for i in members],
            lambda j, members=members: _policies_for(config, model.cfg, len(grid[members[j]].ids)),
            batch_size=config.batch_size, max_new_tokens=lambda rows, members=members: max(
                grid[members[j]].new_tokens for j in rows),
            stop_ids=model.tokenizer.stop_ids, names=tuple(config.policies))

      key = f"cell-{config.task}-L{length}-d{depth:g}"
      cell = run_dir.unit(key, compute) if run_dir is not None else compute()
      prefill_seconds += cell["prefill_seconds"]
      prefill_tokens += cell["prompt_tokens"]
      for name in config.policies:
        decode_seconds[name] += cell["decode_seconds"][name]
        for j, i in enumerate(members):
          outputs[name][i] = list(cell["outputs"][name][j])
      bar.advance(len(members), postfix=f"len {length}, prefill {prefill_tokens / max(prefill_seconds, 1e-9):.0f} "
                  "tok/s")
  return outputs, {"prefill_seconds": prefill_seconds, "decode_seconds": decode_seconds,
                   "prefill_tokens_per_second": prefill_tokens / max(prefill_seconds, 1e-9)}


def run(config: ml_collections.ConfigDict, run_dir: str | runs.RunDir, *, model=None) -> dict[str, Any]:
  """Runs the grid for every policy; prints the tables, writes `heatmap.png`, returns the figures.

  Args:
    config: a `configs/passkey.py` / `configs/niah.py` config.
    run_dir: the run directory (units, the plot; the launcher writes config.json and results.json there).
    model: an already loaded `lacax.weights.loader.Model` (tests); default `load_model(config.model.path)`.
  """
  if model is None:
    validate(config)
  else:
    validate_config(config)
  run_dir = runs.as_run_dir(run_dir)
  model = model or jobs.model_from_config(config)
  tok = model.tokenizer
  if tok is None:
    raise errors.ConfigError(f"model.path={config.model.path!r} ships no tokenizer; the {config.task} job needs one")
  lengths, depths = tuple(config.grid.lengths), tuple(float(d) for d in config.grid.depths)
  tokenize = prompt_encoder(tok, config.chat)
  needle, haystack = None, None
  if config.task == "niah":
    needle = config.needle.to_dict()
    haystack = load_text(config.haystack.path, config.haystack.field,
                         encoding=config.haystack.get("encoding", "utf-8"), option="haystack")
  start = time.perf_counter()
  grid = ng.build_grid(tokenize, task=config.task, lengths=lengths, depths=depths,
                       samples_per_cell=config.grid.samples_per_cell, seed=config.grid.seed,
                       depth_unit=config.grid.depth_unit, suffix_mode=config.grid.suffix_mode,
                       extra_new_tokens=config.extra_new_tokens,
                       answer_tokenize=lambda text: tok.encode(text, add_bos=False), haystack=haystack,
                       needle=needle, protocol=config.grid.get("protocol", "lacache"), tokenizer=tok)
  logging.info("built %d prompts in %.1fs", len(grid), time.perf_counter() - start)
  longest = max(len(s.ids) + s.new_tokens for s in grid)
  if longest > model.cfg.max_position_embeddings:
    logging.warning("the longest prompt + answer has %d tokens, beyond the model's trained context %d",
                    longest, model.cfg.max_position_embeddings)

  outputs, timing = generate_grid(model, grid, config, run_dir)

  kvpress = config.grid.get("protocol", "lacache") == "kvpress"
  rates, figures, records = {}, {}, []
  correct: dict[str, list[bool]] = {name: [] for name in config.policies}
  for i, sample in enumerate(grid):
    record = {"length": sample.length, "depth": sample.depth, "seed": sample.seed, "prompt_tokens": len(sample.ids),
              "realised_depth": sample.sample.depth, "answer": sample.sample.answer, "outputs": {}}
    for name in config.policies:
      text = ng.completion_text(tok, outputs[name][i], sample.new_tokens)
      ok = pk.score_passkey(text, sample.sample.answer)
      correct[name].append(ok)
      record["outputs"][name] = {"text": text, "correct": ok}
      if kvpress:  # kvpress's own score: ROUGE (here ROUGE-L F, rouge 1.0.1) of the prediction against the needle
        record["outputs"][name]["rouge_l"] = rouge_l_f1(text, sample.sample.needle)
    records.append(record)
  example_len = max(len(s.ids) for s in grid)
  print(f"\n{config.task}: {model.cfg.name}, {len(grid)} prompts ({config.grid.samples_per_cell} per cell), "
        f"budget {config.cache.budget} of the prompt, pass rate (%) per needle depth x context length")
  for name in config.policies:
    rates[name] = ng.pass_rate_grid(grid, correct[name], lengths, depths)
    policy = registry.make_prefill_policy(name, config.cache, model.cfg, prompt_len=example_len, protocol="niah")
    figures[name] = {
        "pass_rate": rates[name].tolist(), "mean": float(np.nanmean(rates[name])),
        "by_length": np.nanmean(rates[name], axis=0).tolist(), "by_depth": np.nanmean(rates[name], axis=1).tolist(),
        "decode_seconds": timing["decode_seconds"][name], "policy_at_longest_prompt": repr(policy),
    }
    if kvpress:
      figures[name]["rouge_l"] = float(np.mean([r["outputs"][name]["rouge_l"] for r in records]))
    print("\n" + ng.format_grid(name, rates[name], lengths, depths))
  print("\n" + f"{'policy':<12}{'mean %':>8}" + "".join(f"{ng.length_label(n):>8}" for n in lengths))
  for name in config.policies:
    print(f"{name:<12}{100 * figures[name]['mean']:>8.1f}" +
          "".join(f"{100 * r:>8.1f}" for r in figures[name]["by_length"]))
  out = {"figures": figures, "lengths": list(lengths), "depths": list(depths), "model": model.cfg.name,
         "task": config.task, "samples": records, "prefill_seconds": timing["prefill_seconds"],
         "prefill_tokens_per_second": timing["prefill_tokens_per_second"], "model_fingerprint": model.fingerprint()}
  plot_path = run_dir.file("heatmap.png")
  plot_error = runs.safe_plot("heatmap.png", ng.plot_heatmaps, rates, lengths, depths, plot_path,
                              f"{config.task}: {model.cfg.name}, budget {config.cache.budget}, "
                              f"{config.grid.samples_per_cell} samples/cell")
  print(f"plot: {plot_path}" if plot_error is None else f"plot failed: {plot_error}")
  if plot_error is not None:
    out["plot_errors"] = {"heatmap.png": plot_error}
  return out
