"""MG-Verilog fine-tuning: answer-only LoRA SFT on (description level, code) pairs with lacax's training core.

The reference (GATECH-EIC/mg-verilog `sft_code/qlora.py`) trains LoRA adapters on all linear layers with the
loss on the answer only (`train_on_source=False`), over the union of the per-level datasets. Here:

  - the pairs of each epoch come from the `BalancedSampler` (union / random_level / weighted / single:<level>);
  - each pair becomes an instruction record whose prompt is exactly what the evaluation harness sends
    (`render_prompt(problem, "chat", system="")`: the description at that level, the instruction to answer with
    module TopModule) and whose answer is the reference in a ```verilog block; `lacax.train.instruction_dataset`
    renders it with the chat template and masks the loss to the answer tokens;
  - LoRA is lacax's own (`lacax.model.lora`, set up by `lacax.train.lm.lora_setup`): adapters on the chosen
    projections (B starts at zero, so the untrained adapter leaves the model unchanged) trained beside the
    frozen base weights, applied inside the one forward (`llama.ForwardOptions.lora`), and folded into the base
    weights (`lacax.model.lora.merge`) for the returned parameters;
  - `lacax.train.Trainer` does the rest (AdamW, warmup, clipping, gradient accumulation, metrics.jsonl,
    loss_curve.png, checkpoints).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import jax

from lacax import train
from lacax.hw.bench.problem import render_prompt
from lacax.hw.mg_verilog.sampler import BalancedSampler
from lacax.model import llama
from lacax.model import lora as lora_lib
from lacax.train import lm

# The reference trains adapters on every linear layer of the transformer blocks.
ALL_TARGETS = tuple(llama.LORA_TARGETS)


def sft_records(tasks: Sequence[Any], pairs: Sequence[tuple[int, str]]) -> list[dict[str, str]]:
  """Instruction records {instruction, input, output} for (task index, level) pairs: the harness's own prompt
  (user turn, no system text) and the reference design in a ```verilog block."""
  out = []
  for i, level in pairs:
    prob = tasks[i].problem(level)
    (user,) = render_prompt(prob, "chat", system="")
    out.append({"instruction": user["content"], "input": "",
                "output": f"```verilog\n{prob.reference.rstrip()}\n```"})
  return out


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """What one fine-tuning run does.

  Attributes:
    mode: the sampler mode ("union", "random_level", "weighted", "single:<level>").
    epochs: passes of the sampler over the training tasks (the pairs are fixed in this order).
    steps: optimizer steps (0 = as many as `epochs` of pairs give at `batch_size * accum_steps` per step).
    batch_size, accum_steps, seq_len: the batch shape (rows beyond seq_len + 1 tokens are truncated).
    learning_rate, warmup_steps, clip_norm: the optimizer (AdamW, warmup then constant, as the reference).
    lora: the adapter (`lacax.model.lora.LoraConfig`; default: rank 8, alpha 16 on every projection).
    weights: level weights for "weighted".
    compute_dtype: "float32" or "bfloat16".
    seed: the sampler seed, also the seed of the adapters' A matrices.
  """

  mode: str = "union"
  epochs: int = 1
  steps: int = 0
  batch_size: int = 4
  accum_steps: int = 1
  seq_len: int = 512
  learning_rate: float = 2e-4
  warmup_steps: int = 0
  clip_norm: float = 0.3
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig(targets=ALL_TARGETS)
  weights: Mapping[str, float] | None = None
  compute_dtype: str = "float32"
  seed: int = 0


def training_pairs(tasks: Sequence[Any], config: "FinetuneConfig",
                   levels: Sequence[str] = ("high_level", "detailed", "block", "line")) -> list[tuple[int, str]]:
  """The (task index, level) pairs of `config.epochs` sampler epochs, in training order."""
  from lacax.hw.mg_verilog.records import from_task  # pylint: disable=g-import-not-at-top

  samp = BalancedSampler([from_task(t) for t in tasks], config.mode, levels=levels, weights=config.weights,
                         seed=config.seed)
  return [p for e in range(config.epochs) for p in samp.epoch(e)]


def finetune(model, tasks: Sequence[Any], config: FinetuneConfig, *, run_dir: str | None = None,
             levels: Sequence[str] = ("high_level", "detailed", "block", "line")) -> tuple[dict[str, Any], dict]:
  """Answer-only LoRA SFT of `model` (a loaded lacax model with a tokenizer) on the tasks' (level, code) pairs.

  Returns:
    (merged params, info: pairs per level, steps, first / last training loss, records).
  """
  if model.tokenizer is None:
    raise ValueError(f"model {getattr(model, 'source', '?')!r} has no tokenizer; fine-tuning needs one")
  pairs = training_pairs(tasks, config, levels)
  records = sft_records(tasks, pairs)
  data = train.instruction_dataset(model.tokenizer, records, seq_len=config.seq_len, batch_size=config.batch_size,
                                   seed=None)  # the sampler already fixed the order (and each epoch's levels)
  steps = config.steps or max(1, len(records) // (config.batch_size * config.accum_steps))
  lcfg = config.lora
  setup = lm.lora_setup(model, rank=lcfg.rank, alpha=lcfg.alpha, dropout=lcfg.dropout, targets=lcfg.targets,
                        seed=config.seed)
  # The reference's schedule: constant learning rate after a linear warm-up (qlora.py: lr_scheduler_type
  # "constant", warmup_ratio 0.03), AdamW, gradient clipping at 0.3.
  opt, schedule = train.make_optimizer(train.OptimizerConfig(learning_rate=config.learning_rate,
                                                             schedule="constant",
                                                             warmup_steps=min(config.warmup_steps, steps - 1),
                                                             clip_norm=config.clip_norm), steps)
  state = train.create_train_state(setup.params, opt, labels=setup.labels, seed=config.seed)
  trainer = train.Trainer(setup.loss_fn, opt, train.TrainConfig(steps=steps, accum_steps=config.accum_steps,
                                                                compute_dtype=config.compute_dtype,
                                                                progress=False, log_every=max(1, steps // 10)),
                          schedule=schedule, labels=setup.labels)
  state, recs = trainer.fit(state, data.batch, run_dir=run_dir)
  losses = [r["loss"] for r in recs if "loss" in r and r.get("split", "train") == "train"]
  counts = {l: sum(1 for _, x in pairs if x == l) for l in levels}
  logging.info("mg_verilog finetune %s: %d pairs %s, %d steps, loss %s -> %s", config.mode, len(pairs), counts,
               steps, losses[:1], losses[-1:])
  p = jax.device_get(state.params)
  merged = lora_lib.merge(p["params"], p["lora"], setup.lora_config)
  return merged, {"mode": config.mode, "pairs": len(pairs), "pairs_per_level": counts, "steps": steps,
                  "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                  "records": recs}
