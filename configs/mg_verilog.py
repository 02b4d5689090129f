"""MG-Verilog (arXiv 2407.01910): balanced vs single-level LoRA fine-tuning of SmolLM2-135M, pass@k per level.

  python -m experiments.run --config=configs/mg_verilog.py:cpu        # sized for ~1 h on 2 idle CPU cores
  python -m experiments.run --config=configs/mg_verilog.py --config.benchmarks.verilog_eval=/path/to/verilog-eval

The training corpus is lacax's synthetic multi-grained tasks (true labels at all four levels, see
`lacax/hw/mg_verilog/tasks.py`); the held-out sets are unseen parameter sets of the trained templates and whole
unseen template families. Variants: "base" (no fine-tuning), "union" (the reference code's balanced scheme),
"random_level" (the paper's wording), and the single-level baselines. LoRA r / alpha / targets follow the
reference's "all linear layers" (its r=64, alpha=16 at 7B; r=16 here for 135M). Evaluation: MG-Verilog
samples 20 completions at temperature 0.7 for pass@1/5/10; the "cpu" variant samples 5 (pass@1/5).

Variants of this config: "" (full), "cpu" (sized for about an hour on 2 idle cores, an estimate from step
costs, not a measured run: 2 tasks per template, 40 steps of batch 2 per fine-tune at seq_len 384, 8 tasks per
held-out set, n=5, 192 new tokens; seq_len 384 keeps 97% of the training pairs whole: their p95 is 293 tokens, the
longest 426), "smoke" (one fine-tune of 4 steps, 2 tasks per set, 2 levels: checks the pipeline), "tiny" (smoke
on a tiny random model: the job's test).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "mg_verilog"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.model = ml_collections.ConfigDict(dict(  # path "" = embedded SmolLM2-135M-Instruct; init "random" = tiny model
      path="", dtype="float32", init="",
      random=dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, seed=0)))
  c.data = ml_collections.ConfigDict(dict(per_template=8, seed=0))
  c.split = ml_collections.ConfigDict(dict(held_out_families=("fsm",), test_fraction=0.25))
  c.variants = ("base", "union", "random_level", "single:high_level", "single:detailed", "single:block",
                "single:line")
  c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0, dropout=0.0,  # lacax.model.lora.LoraConfig
                                          targets=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")))
  c.train = ml_collections.ConfigDict(dict(
      epochs=3, steps=0,           # 0: as many steps as the epochs of pairs give
      batch_size=4, accum_steps=1, seq_len=768, learning_rate=2e-4, warmup_steps=10,
      compute_dtype="float32",
      weights={"high_level": 0.25, "detailed": 0.25, "block": 0.25, "line": 0.25},  # for "weighted"
  ))
  c.eval = ml_collections.ConfigDict(dict(
      levels=("high_level", "detailed", "block", "line"), n=20, temperature=0.7, top_p=0.95, max_tokens=384,
      stop=("endmodule",), seed=0, ks=(1, 5, 10), max_tasks_per_set=0, batch_size=512, max_batch=64))
  c.benchmarks = ml_collections.ConfigDict(dict(verilog_eval="", rtllm="", limit=0))
  c.workers = 0
  for v in [v for v in (arg or "").split(",") if v]:
    if v == "cpu":
      c.data.per_template = 2
      c.variants = ("base", "union", "single:high_level", "single:detailed", "single:block", "single:line")
      c.train.steps, c.train.batch_size, c.train.seq_len, c.train.learning_rate = 40, 2, 384, 5e-4
      c.eval.n, c.eval.ks, c.eval.max_tokens, c.eval.max_tasks_per_set = 5, (1, 5), 192, 8
    elif v in ("smoke", "tiny"):
      c.data.per_template = 2
      c.variants = ("base", "union")
      c.train.steps, c.train.batch_size, c.train.seq_len = 4, 2, 512
      c.eval.n, c.eval.ks, c.eval.max_tokens, c.eval.max_tasks_per_set = 2, (1, 2), 96, 2
      c.eval.levels = ("high_level", "detailed")
      if v == "tiny":
        c.model.init = "random"
        c.train.seq_len, c.eval.n, c.eval.ks, c.eval.max_tokens, c.eval.max_tasks_per_set = 384, 2, (1, 2), 24, 1
    else:
      raise ValueError(f"unknown variant {v!r} of configs/mg_verilog.py (cpu, smoke, tiny)")
  return c
