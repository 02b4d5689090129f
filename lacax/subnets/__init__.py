"""AmoebaLLM (arXiv 2411.10606, NeurIPS 2024): one model, instant subnets of any depth and width.

Reference: GATECH-EIC/AmoebaLLM (commit abb8f7e, MIT). The reference's behaviour is the default everywhere;
the paper's variants and lacax's fixes of the release's quirks are options, named where they are made.

  depth       knowledge-preserving DP layer selection (`dp_layer_selection` -> `DepthStrategy.strategy[m]`),
              and the baselines: drop-last, uniform, ShortGPT block influence.
  width       FLAP (WIFV, AL-AM) nested head-group / FFN-channel masks keyed by exact width, bias compensation.
  calibrate   activation statistics, residual stream (block influence) of the full model.
  shape       `SubnetShape` (static: layer mask, width), `SubnetSpace` (the grid), `SubnetArrays` (traced).
  execute     masked execution of any shape through `lacax.model.llama.forward` (one compile for all shapes).
  smol        the shape-aware mixture of LoRAs: 5 experts, one noisy top-2 router on the shape encoding.
  distill     in-place distillation, loss-magnitude balancing, sandwich sampling.
"""
