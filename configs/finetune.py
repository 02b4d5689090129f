"""Fine-tune SmolLM2 (full or LoRA) on a text or instruction file with lacax's training loop.

  python -m experiments.run --config=configs/finetune.py                 # LoRA on the embedded offline text
  python -m experiments.run --config=configs/finetune.py:cpu             # a few minutes on 2 CPU cores
  python -m experiments.run --config=configs/finetune.py --config.mode=full --config.optimizer.learning_rate=2e-5
  python -m experiments.run --config=configs/finetune.py --config.data.path=alpaca_data.json    # answer-only loss
  python -m experiments.run --config=configs/finetune.py --config.mesh.shape="(1,8,1)"          # FSDP over 8 chips

A run killed (Ctrl-C, SIGKILL, a pre-empted VM) resumes when started again with the same command: checkpoints
go to `train.checkpoint_dir`, by default `<results_dir>/finetune/runs/<hash of the config>/checkpoints`, so the
same config finds its checkpoints and a different one starts afresh (set `train.checkpoint_dir` to choose; a
resume whose shapes differ from the saved run is refused, naming the config fields that changed).

Data: `data.path` "" = the embedded offline text (the prose the main job reads); a .txt file, a folder of *.txt
or a .jsonl of `data.field` records = packed causal-LM windows; a .json / .jsonl of Alpaca-style
instruction/input/output records (`data.kind="instruction"`, or "auto": detected from the first record) = one
example per row, loss on the answer only.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "finetune"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  # dtype: the stored weights (float32 master weights for the trained part either way).
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  c.mode = "lora"  # "lora" or "full"
  # LoRA (Hu et al., arXiv 2106.09685): rank, alpha (scale alpha / rank), dropout on the adapter input, targets
  # among q, k, v, o, gate, up, down (peft's Llama default is q, v).
  c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.05, targets="q,v", seed=0))
  # kind: "auto", "text" or "instruction". eval_rows: rows held out for evaluation. max_chars: cap the text (0 = all).
  c.data = ml_collections.ConfigDict(dict(path="", field="text", kind="auto", seq_len=256, batch_size=8, seed=0,
                                          eval_rows=16, max_chars=0))
  c.optimizer = ml_collections.ConfigDict(dict(name="adamw", learning_rate=2e-4, schedule="warmup_cosine",
                                               warmup_steps=10, end_lr_ratio=0.1, b1=0.9, b2=0.999, eps=1e-8,
                                               weight_decay=0.0, decay_all=False, clip_norm=1.0))
  # compute_dtype: "" = the stored dtype, or "bfloat16" (bfloat16 products over float32 master weights, cast where
  # each layer uses them; lacax.train.lm); activation_dtype: "" = the residual stream in the stored dtype, or
  # "bfloat16" (less activation memory on accelerators; slower on CPU).
  # trainable: regexes of trained parameters in full mode ("all"); layer_window: "" or "start:stop".
  c.train = ml_collections.ConfigDict(dict(
      steps=200, accum_steps=1, compute_dtype="", activation_dtype="", log_every=10, eval_every=50, eval_batches=2,
      checkpoint_every=50, keep_checkpoints=2, checkpoint_dir="", seed=0, progress=True, trainable="all",
      layer_window=""))
  c.export = ml_collections.ConfigDict(dict(params=True, merged=True))
  c.mesh = ml_collections.ConfigDict(dict(shape=(), axes=("data", "fsdp", "tensor"), rules=""))
  if arg == "cpu":
    c.data.seq_len = 128
    c.data.batch_size = 4
    c.data.eval_rows = 8
    c.data.max_chars = 400_000
    c.train.steps = 30
    c.train.log_every = 5
    c.train.eval_every = 15
    c.train.eval_batches = 2
    c.train.checkpoint_every = 15
    c.optimizer.warmup_steps = 3
    c.optimizer.learning_rate = 1e-3
  elif arg not in (None, ""):
    raise ValueError(f"configs/finetune.py variant {arg!r} is unknown; expected '' or 'cpu'")
  return c
