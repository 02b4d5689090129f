"""ScaleRTL test-time scaling (arXiv 2506.05566): repeated sampling, budget-forced reflection, reflection traces.

  # the embedded SmolLM2-135M-Instruct on held-out generated tasks, sized for a CPU
  python -m experiments.run --config=configs/scale_rtl.py:cpu
  # the same on a VerilogEval v2 subset
  python -m experiments.run --config=configs/scale_rtl.py:cpu --config.benchmark.kind=verilog_eval \
      --config.benchmark.path=/path/to/verilog-eval --config.benchmark.limit=8
  # a capable model behind any OpenAI-compatible server with a raw /v1/completions endpoint (lacax serve, vLLM,
  # llama.cpp, TGI): budget forcing continues the raw prefix there
  python -m experiments.run --config=configs/scale_rtl.py --config.backend.kind=openai_http \
      --config.backend.base_url=http://127.0.0.1:8000/v1 --config.backend.model=MODEL \
      --config.benchmark.kind=verilog_eval --config.benchmark.path=/path/to/verilog-eval
  # the scripted planted-bug backend (machinery check, seconds): fail at N=0, pass after one cue
  python -m experiments.run --config=configs/scale_rtl.py:tiny

Variants: "" (local model, every held-out generated task, N up to 4, budgets 256..2048, 16 samples),
"cpu" (8 tasks, N up to 2, two budgets, 4 samples), "tiny" (the planted backend, 6 tasks), "think" (reasoning
models: the end-of-think marker triggers the cue), "feedback" (the simulator-feedback EXTENSION, not ScaleRTL).
The held-out tasks use seed 1; the traces are built from seed-0 tasks (the fine-tuning side).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "scale_rtl"
  c.results_dir = "results"
  c.resume = ""
  c.benchmark = ml_collections.ConfigDict(dict(
      kind="mg_synthetic",   # mg_synthetic | verilog_eval | rtllm | logikbench
      path="", task="spec-to-rtl", groups="basic,arithmetic,memory,blocks",
      per_template=1, seed=1, level="detailed",  # seed 1: held out from the seed-0 trace tasks
      limit=0, ids="",
  ))
  c.backend = ml_collections.ConfigDict(dict(
      kind="local",          # local | openai_http | planted | oracle | replay
      path="", dtype="float32", cache_policy="full",   # the KV continuation needs the full cache
      base_url="", model="",
  ))
  # One round's sampling; n samples per problem for the reflection runs.
  c.sampling = ml_collections.ConfigDict(dict(n=1, temperature=0.0, top_p=1.0, max_tokens=512, seed=0,
                                              stop=("endmodule",)))
  c.reflect = ml_collections.ConfigDict(dict(
      rounds=(0, 1, 2, 3, 4),          # scored from one run with max(rounds) cues
      budgets=(256, 512, 1024, 2048),  # thinking-token budgets, each its own run
      format="module",                 # module (no-think: `endmodule` triggers) | think (`</think>`)
      rules="verilog_eval+extra", cue="",
      feedback="none",                 # none (ScaleRTL, tool-free) | simulator (EXTENSION, AutoChip-style)
      continuation="auto",             # auto | kv (same KV cache) | text (raw prefix)
  ))
  c.repeated = ml_collections.ConfigDict(dict(n=16, temperature=0.8, top_p=0.95))
  c.traces = ml_collections.ConfigDict(dict(enabled=True, per_template=2, seed=0))
  c.prompt_style = "chat"
  c.simulator = "iverilog"
  c.workers = 0
  for v in [v for v in (arg or "").split(",") if v]:
    if v == "cpu":
      c.benchmark.limit = 8
      c.sampling.max_tokens = 256
      c.reflect.rounds = (0, 1, 2)
      c.reflect.budgets = (192, 384)
      c.repeated.n = 4
      c.traces.per_template = 1
    elif v == "tiny":
      c.backend.kind = "planted"
      c.benchmark.limit = 6
      c.benchmark.ids = ""
      c.reflect.rounds = (0, 1, 2)
      c.reflect.budgets = (40, 400)
      c.repeated.n = 2
      c.traces.per_template = 1
      c.workers = 2
    elif v == "think":
      c.reflect.format = "think"
      c.sampling.stop = ()
    elif v == "feedback":
      c.reflect.feedback = "simulator"
    else:
      raise ValueError(f"unknown variant {v!r} of configs/scale_rtl.py (cpu, tiny, think, feedback)")
  return c
