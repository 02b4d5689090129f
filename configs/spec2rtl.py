"""Spec2RTL-Agent (arXiv 2506.13905): specification documents -> verified RTL, human interventions per spec and stage.

  # the shipped specs on the reference-replaying scripted backend (checks the pipeline and tools: 0 interventions)
  python -m experiments.run --config=configs/spec2rtl.py:reference
  # the embedded SmolLM2-135M-Instruct with small budgets (it mostly escalates: see the README)
  python -m experiments.run --config=configs/spec2rtl.py:cpu
  # a capable model behind any OpenAI-compatible server (vLLM, llama.cpp, lacax serve)
  python -m experiments.run --config=configs/spec2rtl.py --config.backend.kind=openai_http \
      --config.backend.base_url=http://127.0.0.1:8000/v1 --config.backend.model=<model>
  # your own spec file (format: lacax/hw/spec2rtl/spec.py)
  python -m experiments.run --config=configs/spec2rtl.py:reference --config.specs=/path/to/my_spec.md

Variants: "" (the local model, paper-like budgets), "reference" (the reference-replaying scripted backend),
"cpu" (the local model, 2 specs, small budgets and 256 new tokens per answer), "tiny" (reference backend, crc8
only, 8 random vectors: the job test).
"""

import ml_collections

SHIPPED = "crc8,crc16,crc32,gcd,fir8,alu"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "spec2rtl"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.specs = SHIPPED  # comma-separated shipped names or spec file paths
  c.backend = ml_collections.ConfigDict(dict(
      kind="local",          # reference | replay | local | openai_http
      path="",               # local: checkpoint / GGUF ("" = embedded SmolLM2-135M-Instruct); replay: JSONL
      dtype="float32", cache_policy="full",
      base_url="", model="",  # openai_http (the API key comes from the environment)
  ))
  c.sampling = ml_collections.ConfigDict(dict(temperature=0.0, top_p=1.0, max_tokens=768, seed=0))
  c.budgets = ml_collections.ConfigDict(dict(plan_rounds=3, attempts=2, reflections=6, vectors=24, max_calls=400))
  c.human = "reference"   # reference (the shipped reference stage outputs stand in for an engineer) | none
  c.synthesize = True     # yosys on the final RTL
  c.record = ""           # write every backend call to this replay JSONL (rerun later with backend.kind=replay)
  for v in [v for v in (arg or "").split(",") if v]:
    if v == "reference":
      c.backend.kind = "reference"
    elif v == "cpu":
      c.specs = "crc8,alu"
      c.sampling.max_tokens = 256
      c.budgets.plan_rounds, c.budgets.attempts, c.budgets.reflections = 1, 1, 2
    elif v == "tiny":
      c.backend.kind = "reference"
      c.specs = "crc8"
      c.budgets.vectors = 8
    else:
      raise ValueError(f"unknown variant {v!r} of configs/spec2rtl.py (reference, cpu, tiny)")
  return c
