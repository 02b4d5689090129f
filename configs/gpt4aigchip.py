"""GPT4AIGChip (arXiv 2309.10730): LLM-driven evolutionary search over lacax's GEMM accelerator template vs
random search at the same evaluation budget, scored by iverilog cycles and yosys cells.

  # the scripted designer (no language model): mutations of the tournament parent, through the backend path
  python -m experiments.run --config=configs/gpt4aigchip.py:cpu
  # the embedded SmolLM2-135M-Instruct as the designer
  python -m experiments.run --config=configs/gpt4aigchip.py:cpu,local
  # a capable model behind an OpenAI-compatible server (lacax serve, vLLM, llama.cpp, ...)
  python -m experiments.run --config=configs/gpt4aigchip.py --config.backend.kind=openai_http \
      --config.backend.base_url=http://127.0.0.1:8000/v1 --config.backend.model=<name>

Methods: "evolution" (tournament selection, the proposer writes each child) and "random" (uniform samples of the
knob space, the baseline), each for every seed in `search.seeds` with `search.budget` proposals. Proposers
(`proposer`): "backend" (the backend writes JSON knobs, or with `search.mode="code"` the PE module from a
demo-augmented prompt) or "heuristic" (mutation + crossover, no model). Backends (`backend.kind`): "scripted"
(`lacax.hw.aigchip.search.scripted_designer`), "local" (a lacax model; "" = the embedded default), "openai_http".

Variants: "" (8x8x8 GEMM of 8-bit numbers, arrays up to 8x8, budget 40, seeds 0-2), "cpu" (8x8x8 of 4-bit numbers,
arrays up to 4x4, budget 16, seeds 0-1: yosys dominates, a few seconds per design), "tiny" (4x4x4 of 2-bit numbers,
budget 4, one seed, synthesis on: the job test), "local" (the local model as the backend), "heuristic",
"code" (the backend writes the PE module), "ablation" (adds the demo ablations), "dslx" (the PE's
multiply-accumulate in DSLX through XLS).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "gpt4aigchip"
  c.results_dir = "results"
  c.resume = ""
  c.workload = ml_collections.ConfigDict(dict(m=8, k=8, n=8, width=8, seed=0))
  c.space = ml_collections.ConfigDict(dict(  # a subset of lacax.hw.aigchip.template.SPACE per knob
      rows=(1, 2, 4, 8), cols=(1, 2, 4, 8), interconnect=("broadcast", "systolic"), buf_depth=(4, 8, 16, 32, 64),
      banks=(1, 2, 4, 8), dataflow=("os", "ws", "is")))
  c.search = ml_collections.ConfigDict(dict(budget=40, population=8, tournament=3, seeds=(0, 1, 2), mode="config",
                                            area_weight=1.0, synth=True,
                                            cache_dir=""))  # "" = evaluations cached in the run only
  # The PE: "verilog" (lacax's) or "dslx" (its multiply-accumulate written in DSLX and built by XLS, the offline
  # stand-in for the paper's HLS flow; lacax.hw.aigchip.hls).
  c.template = ml_collections.ConfigDict(dict(pe="verilog"))
  c.methods = ("evolution", "random")
  c.proposer = "backend"  # backend | heuristic
  c.backend = ml_collections.ConfigDict(dict(
      kind="scripted",       # scripted | local | openai_http
      path="", dtype="float32", cache_policy="full",   # local ("" = embedded SmolLM2-135M-Instruct)
      base_url="", model="",                           # openai_http (the API key comes from the environment)
  ))
  c.sampling = ml_collections.ConfigDict(dict(temperature=0.8, top_p=0.95, max_tokens=96))
  c.demos = ml_collections.ConfigDict(dict(selector="llm", k=2, library=""))  # search.mode="code"
  # Demo ablations (Tables II-IV): each selector at demos.k demos, and 0..3 demos of count_selector; the backend
  # writes the PE module n times per cell; compile / functional / auto-fixed pass@k.
  c.ablation = ml_collections.ConfigDict(dict(enabled=False, selectors=("llm", "embedding", "bm25", "random",
                                                                         "dissimilar", "none"),
                                              count_selector="bm25", counts=(0, 1, 2, 3), targets=("os",), n=4,
                                              temperature=0.8, max_tokens=384))
  for v in [v for v in (arg or "").split(",") if v]:
    if v == "cpu":
      c.workload.width = 4
      c.space.rows, c.space.cols, c.space.banks = (1, 2, 4), (1, 2, 4), (1, 2, 4)
      c.space.buf_depth = (8, 16, 32, 64)
      c.search.budget, c.search.population, c.search.seeds = 16, 5, (0, 1)
    elif v == "tiny":
      c.workload.m = c.workload.k = c.workload.n = 4
      c.workload.width = 2
      c.space.rows, c.space.cols, c.space.banks, c.space.buf_depth = (1, 2), (1, 2), (1, 2), (8, 16)
      c.search.budget, c.search.population, c.search.tournament, c.search.seeds = 4, 2, 2, (0,)
    elif v == "local":
      c.backend.kind = "local"
    elif v == "heuristic":
      c.proposer = "heuristic"
    elif v == "code":
      c.search.mode = "code"
    elif v == "ablation":
      c.ablation.enabled = True
    elif v == "dslx":
      c.template.pe = "dslx"
    else:
      raise ValueError(f"variant {v!r} of configs/gpt4aigchip.py is unknown (cpu, tiny, local, heuristic, code, ablation, dslx)")
  return c
