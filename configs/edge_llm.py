"""Edge-LLM: measure sensitivity, search a LUC policy for a memory budget, compress, tune with adaptive layer
tuning, evaluate with and without voting (arXiv 2406.15758).

  python -m experiments.run --config=configs/edge_llm.py          # reference-sized settings (GPU/TPU)
  python -m experiments.run --config=configs/edge_llm.py:cpu      # SmolLM2-135M on 2 CPU cores
  python -m experiments.run --config=configs/edge_llm.py:tiny     # a tiny random model, a minute (tests)

Reference defaults (GATECH-EIC/Edge-LLM `scripts/edge_llm_train.sh`): SparseGPT, total sparsity 0.5, LoRA r 8,
alpha 16, dropout 0.1 on all linear layers, stride 8 (exits every 8 layers), exit heads copied from the LM head
and fed the raw residual stream, lr 4e-4 constant with 3% warmup, clip 0.3, 10k steps on Alpaca. lacax adds a
memory budget (`compress.budget_fraction` of the dense float32 decoder layers' bytes; the embedding and head
stay float32) met by the sensitivity-driven
search, and compares it with uniform policies at equal memory.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "edge_llm"
  c.results_dir = "results"
  c.resume = ""
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32", init="", random=ml_collections.ConfigDict(
      dict(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, seed=0))))
  # Packed text rows ("" = the embedded default text): calibration, held-out evaluation, training.
  c.data = ml_collections.ConfigDict(dict(path="", seq_len=512, batch_size=16, calib_rows=128, eval_rows=64,
                                          max_chars=0))
  c.sensitivity = ml_collections.ConfigDict(dict(ratios=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), bits=(2, 3, 4, 8),
                                                 method="sparsegpt"))
  # budget: the float32 embedding / head / norms plus budget_fraction x the dense float32 decoder layers.
  c.compress = ml_collections.ConfigDict(dict(budget_fraction=0.2, method="sparsegpt", storage="packed",
                                              group_size=0, search_bits=(4, 8), target_sparsity=0.5,
                                              uniform_bits=(4, 8)))
  c.tuning = ml_collections.ConfigDict(dict(stride=8, exit_head="copy", exit_norm="none", rank=8, alpha=16.0,
                                            dropout=0.1, targets=("q", "k", "v", "o", "gate", "up", "down"),
                                            seed=0))
  c.train = ml_collections.ConfigDict(dict(steps=10000, learning_rate=4e-4, schedule="constant", warmup_steps=300,
                                           clip_norm=0.3, weight_decay=0.0, log_every=10))
  # Multiple choice: an offline task of lacax.act.tasks scored by cloze options.
  c.eval = ml_collections.ConfigDict(dict(mc_task="capitals", mc_examples=200, batch_size=16))
  # The hardware scheduling model's device (lacax's own analytic model; see lacax/compress/schedule.py).
  c.schedule = ml_collections.ConfigDict(dict(buffer_bytes=256 * 1024, dram_bytes_per_cycle=16.0, lanes=256,
                                              sparse_skip=0.5, context=512))
  if arg == "cpu":
    c.data.seq_len = 128
    c.data.batch_size = 4
    c.data.calib_rows = 16
    c.data.eval_rows = 16
    c.sensitivity.ratios = (0.1, 0.3, 0.5, 0.7)
    c.sensitivity.bits = (4, 8)
    c.train.steps = 80
    c.train.warmup_steps = 3
    c.train.learning_rate = 4e-4
    c.eval.mc_examples = 100
    # SmolLM2's raw residual stream is too large for a copied head: with the reference's exit_norm="none"
    # every exit's perplexity explodes (1e14-1e65 after tuning; the README's Edge-LLM figures), so this
    # variant puts the frozen final norm before each exit. Pruned 8-bit layers keep only their non-zero codes.
    c.tuning.exit_norm = "final_norm"
    c.compress.storage = "sparse"
  elif arg == "tiny":
    c.model.init = "random"
    c.data.seq_len = 32
    c.data.batch_size = 2
    c.data.calib_rows = 4
    c.data.eval_rows = 4
    c.data.max_chars = 30000
    c.sensitivity.ratios = (0.25, 0.5)
    c.sensitivity.bits = (4, 8)
    c.sensitivity.method = "magnitude"  # SparseGPT itself is tested in tests/test_compress_prune.py
    c.compress.method = "magnitude"
    c.compress.budget_fraction = 0.3
    c.compress.uniform_bits = (8,)
    c.tuning.stride = 2
    c.tuning.rank = 4
    c.tuning.targets = ("q", "v")
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.train.learning_rate = 1e-3
    c.eval.mc_examples = 8
    c.eval.batch_size = 4
    c.schedule.context = 64
  elif arg not in (None, ""):
    raise ValueError(f"configs/edge_llm.py variant {arg!r} is unknown; expected '', 'cpu' or 'tiny'")
  return c
