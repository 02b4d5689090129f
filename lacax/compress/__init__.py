"""Edge-LLM's layer-wise unified compression (LUC) and real low-bit weights.

  calibrate.py    one decoder layer at a time through the one forward: outputs on given inputs, the Gram
                  matrices of every projection's inputs (a `ProjectedWeight` tap);
  quant.py        symmetric per-channel / per-group weight and per-token activation quantizers, fake
                  quantization with the reference's straight-through window;
  prune.py        SparseGPT (unstructured and N:M, OBS updates), Wanda and magnitude pruning as jitted JAX,
                  and sequential pruning of a model through its already-compressed upstream layers;
  sensitivity.py  per-layer output error under each pruning ratio and weight bit-width, measured on
                  calibration tokens, saved as JSON / npz keyed by parsed layer index and tagged with the
                  model's identity;
  allocate.py     the reference sparsity allocation (min-max normalised, modes ordinary / sqrt / square) with
                  clipping and mean-preserving water-filling; bit-width allocation;
  policy.py       `CompressionPolicy` (JSON, validated), the byte model, and a deterministic search for a
                  memory budget;
  packed.py       packed low-bit parameters (`lacax.model.quantized.PackedWeight`) of a compressed model and
                  their resident bytes;
  apply.py        `apply_policy(params, cfg, policy, calib_tokens)` and the perplexity-vs-memory measurement.

Packed types live in `lacax/model/quantized.py` (beside `Int8Weight`); GGUF Q8_0 / Q4_0 / Q4_1 tensors load into
them with `lacax.weights.loader.load_model(path, keep_quantized=True)`.
"""
