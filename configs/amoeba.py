"""AmoebaLLM: calibrate depth (DP) and width (FLAP), one-for-all fine-tune with SMoL, evaluate the subnet grid.

  python -m experiments.run --config=configs/amoeba.py          # reference-sized settings (GPU/TPU)
  python -m experiments.run --config=configs/amoeba.py:cpu      # SmolLM2-135M on 2 CPU cores, under an hour
  python -m experiments.run --config=configs/amoeba.py:tiny     # a tiny random model, a minute (tests)

Reference defaults (GATECH-EIC/AmoebaLLM README): width grid [1, 7/8, 3/4, 5/8], keep the last layer, 5 SMoL
experts with top-2 routing, rank 64, alpha 16, lr 2e-4 constant with 3% warmup, clip 0.3, 4 subnets per step,
pure KD with loss-magnitude balancing. The DP minimises calibration perplexity here (the reference's MMLU
accuracy needs a data set lacax does not ship); min_depth = 2/3 of the layers (20 of 30 for SmolLM2, the
reference's 20 of 32). Baselines at the same parameter ratios: uniform layer dropping, ShortGPT block
influence, FLAP only, and the AmoebaLLM shape before fine-tuning. Ratios are fractions of the decoder
stack's attention + FFN parameters (embeddings are never shrunk).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "amoeba"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  # init: "" loads model.path (default: the embedded SmolLM2-135M-Instruct); "random" builds model.random.
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32", init="", random=ml_collections.ConfigDict(
      dict(num_layers=6, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, seed=0))))
  # Text (""= the embedded default) packed into rows; instructions = an Alpaca JSON/JSONL for fine-tuning.
  c.data = ml_collections.ConfigDict(dict(path="", instructions="", seq_len=256, batch_size=4, calib_rows=64,
                                          eval_rows=64, max_chars=0))
  c.depth = ml_collections.ConfigDict(dict(min_depth=0, keep_last=1, metric="perplexity"))  # 0 = 2L/3
  c.width = ml_collections.ConfigDict(dict(widths=(1.0, 0.875, 0.75, 0.625), rule="closest"))
  c.smol = ml_collections.ConfigDict(dict(num_experts=5, top_k=2, rank=64, alpha=16.0, router_hidden=16,
                                          targets=("q", "k", "v", "o", "gate", "up", "down")))
  c.amoeba = ml_collections.ConfigDict(dict(kd_weight=1.0, balancing=True, num_random=2, reference_kd_mask=False,
                                            seed=0))
  c.train = ml_collections.ConfigDict(dict(steps=10000, learning_rate=2e-4, schedule="constant", warmup_steps=300,
                                           clip_norm=0.3, weight_decay=0.0, compute_dtype="", log_every=10,
                                           checkpoint_every=500, keep_checkpoints=2))
  # grid: evaluate every grid shape (the Pareto plot); False: only the candidate shapes of the ratios.
  c.eval = ml_collections.ConfigDict(dict(ratios=(0.8, 0.65, 0.5), grid=True, export=True))
  if arg == "cpu":
    c.data.seq_len = 128
    c.data.batch_size = 2
    c.data.calib_rows = 16
    c.data.eval_rows = 32
    c.smol.rank = 16
    c.train.steps = 120
    c.train.warmup_steps = 4
    c.train.learning_rate = 5e-4
    c.train.checkpoint_every = 40
  elif arg == "tiny":
    c.model.init = "random"
    c.data.seq_len = 32
    c.data.batch_size = 2
    c.data.calib_rows = 4
    c.data.eval_rows = 4
    c.data.max_chars = 60000
    c.smol.rank = 4
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.train.learning_rate = 1e-3
    c.train.checkpoint_every = 0
    c.eval.ratios = (0.8, 0.65)
  elif arg not in (None, ""):
    raise ValueError(f"configs/amoeba.py variant {arg!r} is unknown; expected '', 'cpu' or 'tiny'")
  return c
