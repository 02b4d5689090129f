"""Any backend on a hardware benchmark folder (VerilogEval v2, RTLLM v2.0, logikbench, generated MG-Verilog tasks).

  # validate the harness: the oracle on VerilogEval v2 spec-to-rtl (153 / 156 with iverilog 11)
  python -m experiments.run --config=configs/verilog_eval.py:oracle --config.benchmark.path=/path/to/verilog-eval
  python -m experiments.run --config=configs/verilog_eval.py:oracle --config.benchmark.kind=rtllm \
      --config.benchmark.path=/path/to/RTLLM                                          # 46 / 50
  # the embedded SmolLM2-135M-Instruct, a few problems on CPU
  python -m experiments.run --config=configs/verilog_eval.py:cpu --config.benchmark.path=/path/to/verilog-eval
  # a server (lacax serve, vLLM, ...) through the OpenAI-compatible backend
  python -m experiments.run --config=configs/verilog_eval.py --config.backend.kind=openai_http \
      --config.backend.base_url=http://127.0.0.1:8000/v1 --config.benchmark.path=...

Variants: "" (local model, VerilogEval v2's n=1 greedy setting), "oracle", "cpu" (local model, 10 problems,
384 new tokens), "n20" (VerilogEval v2's sampled setting: n=20, T=0.85, top_p=0.95).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "verilog_eval"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.benchmark = ml_collections.ConfigDict(dict(
      kind="verilog_eval",   # verilog_eval | rtllm | logikbench | mg_synthetic
      path="",               # your checkout (lacax ships no benchmark data)
      task="spec-to-rtl",    # verilog_eval: spec-to-rtl | code-complete
      groups="basic,arithmetic,memory,blocks",  # logikbench
      per_template=2, seed=0, level="detailed",  # mg_synthetic
      limit=0, ids="",
  ))
  c.backend = ml_collections.ConfigDict(dict(
      kind="local",          # oracle | replay | local | openai_http
      path="",               # local: checkpoint / GGUF ("" = embedded SmolLM2-135M-Instruct); replay: JSONL
      dtype="float32", cache_policy="full",
      base_url="", model="",  # openai_http (the API key comes from the environment)
  ))
  # VerilogEval v2's greedy setting (n=1, T=0); its sampled one is n=20, T=0.85, top_p=0.95 (variant n20).
  c.sampling = ml_collections.ConfigDict(dict(n=1, temperature=0.0, top_p=1.0, max_tokens=1024, seed=0,
                                              stop=("endmodule",)))
  c.prompt_style = "chat"   # chat | raw
  c.simulator = "iverilog"  # iverilog | verilator | iverilog+verilator
  c.workers = 0             # 0 = every usable core
  c.batch_size = 16         # prompts per backend call
  c.ks = (1, 5, 10)
  for v in [v for v in (arg or "").split(",") if v]:
    if v == "oracle":
      c.backend.kind = "oracle"
    elif v == "cpu":
      c.benchmark.limit = 10
      c.sampling.max_tokens = 384
      c.batch_size = 10
    elif v == "n20":
      c.sampling.n, c.sampling.temperature, c.sampling.top_p = 20, 0.85, 0.95
    else:
      raise ValueError(f"unknown variant {v!r} of configs/verilog_eval.py (oracle, cpu, n20)")
  return c
