"""GPT4AIGChip (arXiv 2309.10730, ICCAD 2023): LLM-aided accelerator design on a decoupled template.

  template   the parameterised GEMM accelerator in Verilog (buffers, PE array, broadcast / systolic interconnect,
             controller; os / ws / is dataflows), its self-checking testbench and the exact analytic cycle model
  evaluate   one design for real: iverilog simulation against the golden product, yosys area; fitness; the cache
  autofix    error parser / auto-fixer for model-written modules (iverilog / yosys messages)
  demos      the demo library (package data) and its selectors (llm, embedding, bm25, random, dissimilar, none),
             the demo-augmented prompt
  search     evolutionary search with tournament selection (backend or heuristic proposer), random search
  ablation   demo ablations: compile / functional / auto-fixed pass@k per selector and demo count
"""
