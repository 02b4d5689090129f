"""lacax's one training loop: AmoebaLLM, Edge-LLM, Master-ASR and MG-Verilog fine-tuning all train through it.

The loop is model-agnostic. It trains any parameter pytree under any loss of this contract:

    loss_fn(trainable, frozen, batch, rng) -> (loss, aux)

`trainable` and `frozen` are the two halves of the parameter pytree (`partition` / `combine`), already cast to
the compute dtype (unless the loss casts at use and says so with a `compute_dtype` attribute, as the Llama
losses with `dot_dtype` do: `lacax.train.loop`). `batch` is one micro-batch (a pytree of arrays). `rng` is a PRNG key, or None at evaluation
(be deterministic then). `loss` is a float32 scalar: the mean over `aux["weight"]` units (target tokens, rows).
`aux` holds scalar metrics; give `weight` whenever micro-batches can differ in size, so that gradient
accumulation is exact.

Typical use (a causal LM; see `lacax/jobs/finetune.py` for the whole job):

    from lacax import train
    opt, schedule = train.make_optimizer(train.OptimizerConfig(learning_rate=2e-4, warmup_steps=10), steps)
    labels = train.make_labels(params, trainable=("lora/",))           # or "all", or layer_window=(4, 8)
    state = train.create_train_state(params, opt, labels=labels, seed=0)  # float32 master weights
    loss_fn = train.llama_loss_fn(cfg, dot_dtype="bfloat16")  # bf16 products, float32 weights and stream
    trainer = train.Trainer(loss_fn, opt, train.TrainConfig(steps=steps, accum_steps=4,
                            compute_dtype="bfloat16", eval_every=50, checkpoint_every=100),
                            schedule=schedule, labels=labels, mesh_rules=None)
    data = train.text_dataset(tokenizer, "", seq_len=256, batch_size=8)  # or instruction_dataset(...)
    state, records = trainer.fit(state, data.batch, run_dir=run_dir, checkpoint_dir=f"{run_dir}/checkpoints",
                                 eval_batches=held_out.eval_batches(4), run_config=config)

Public API:

* optimizers (`optim`): `OptimizerConfig` (adamw / sgd; schedules constant, warmup_cosine, warmup_linear;
  `clip_norm`; decoupled weight decay on matrices), `optimizer_config_from(section)`, `make_optimizer(config,
  steps) -> (optax transformation, schedule)`, `make_schedule`.
* state (`state`): `TrainState` (step, trainable, frozen, opt_state, rng; `.params` joins the halves),
  `create_train_state`, `make_labels(params, trainable=, frozen=, layer_window=)` (True / False / a row mask over
  stacked layers per leaf), `partition`, `combine`, `cast_floats`, `count_params`, `path_str`.
* the step and the loop (`loop`): `make_train_step(loss_fn, optimizer, accum_steps=, compute_dtype=, labels=,
  schedule=, mesh_rules=, state_shardings=)` -> jitted `(state, batch) -> (state, metrics)` with the mutable
  state donated; `make_grad_fn` (accumulated gradients alone, e.g. for custom steps); `make_eval_step`,
  `evaluate`; `TrainConfig` (steps, accum_steps, compute_dtype, log_every, eval_every, checkpoint_every,
  keep_checkpoints, save_frozen, progress) and `train_config_from(section)`; `Trainer` (`place`, `step`,
  `evaluate`, `fit`: tqdm progress with loss and tokens/s, `metrics.jsonl` and `loss_curve.png` in the run
  directory, evaluation every N steps, checkpoints every N steps, resume from the latest checkpoint,
  SIGINT / SIGTERM -> checkpoint then KeyboardInterrupt); on a mesh `state_shardings`, `shard_state`, `shard_batch` (FSDP over the
  parameters and the optimizer moments that mirror them, by the rules of `lacax.sharding`).
* checkpoints (`checkpoint`): `Checkpointer(directory, keep=, config=, save_frozen=)` with `save`, `restore`,
  `latest_step`, `all_steps`; `CheckpointError` (corrupted or incomplete checkpoint, names its directory); a
  resume whose state shapes differ is refused naming the config fields that changed.
* data (`data`): `SequenceDataset` (fixed-shape batches `tokens, targets, mask, positions`; `batch(step)` is a
  pure function of the step; `split`, `eval_batches`), `pack_ids`, `text_dataset` (text file / folder / JSONL;
  "" = the embedded offline text of `lacax.eval.texts`), `instruction_dataset` (Alpaca-style records, the chat
  template's prompt, loss on the answer only), `load_records`, `format_instruction`.
* losses (`losses`): `next_token_loss(logits, targets, mask)`, `token_nll`, `lm_loss_fn(logits_fn)`,
  `llama_loss_fn(cfg, params_fn=, forward_kwargs=, dot_dtype=)` (the Llama forward without a KV cache).
* metrics (`metrics`): `MetricsWriter`, `read_metrics`, `plot_loss_curve`.
* causal-LM set-ups (`lm`): `full_setup(model, ...)`, `lora_setup(model, rank=, alpha=, dropout=, targets=,
  layer_window=)` -> `LMSetup` (params, labels, loss_fn, export, cfg); `param_sharding(mesh_rules)` for the
  {"params", "lora"} pytree on a mesh.
"""

from lacax.train.checkpoint import Checkpointer, CheckpointError
from lacax.train.data import (SequenceDataset, format_instruction, instruction_dataset, load_records, pack_ids,
                              text_dataset)
from lacax.train.losses import llama_loss_fn, lm_loss_fn, next_token_loss, token_nll
from lacax.train.loop import (TrainConfig, Trainer, evaluate, make_eval_step, make_grad_fn, make_train_step,
                              shard_batch, shard_state, state_shardings, train_config_from)
from lacax.train.metrics import MetricsWriter, plot_loss_curve, read_metrics
from lacax.train.optim import OptimizerConfig, make_optimizer, make_schedule, optimizer_config_from
from lacax.train.state import (TrainState, cast_floats, combine, count_params, create_train_state, make_labels,
                               partition, path_str)
