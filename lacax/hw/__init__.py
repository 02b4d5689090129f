"""LLMs for hardware design: backends, sandboxed EDA tools, benchmark harness, and the systems built on them.

  backends/     one protocol (`base`): scripted / replay, oracle, the local lacax model, OpenAI-compatible HTTP;
                `factory.make_backend` builds one from a config section
  sandbox       every run of model-written code: temp dir, process group, rlimits, namespaces, capped output
  tools/        iverilog (+ the failure taxonomy in `sim`), verilator, yosys, g++, XLS (DSLX -> Verilog)
  bench/        `Problem`, loaders (VerilogEval v2, RTLLM v2.0, logikbench), pass@k, the harness
  mg_verilog/   MG-Verilog: records and released layouts, MinHash dedup, synthetic multi-grained tasks, the
                balanced sampler, answer-only LoRA fine-tuning
  aigchip/      GPT4AIGChip: the GEMM accelerator template, demo library and selectors, evolutionary search
"""
