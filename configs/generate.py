"""Generate text from the embedded default model (SmolLM2-135M-Instruct) or any checkpoint.

  python -m experiments.run --config=configs/generate.py --config.prompt="Why is the sky blue?"
  python -m experiments.run --config=configs/generate.py:sample --config.model.path=/path/to/Llama-3-8B
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "generate"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  c.prompt = "What is a KV cache in a transformer? Answer in two sentences."
  c.chat = True
  c.max_new_tokens = 64
  c.stop_at_eos = True
  c.seed = 0
  c.warmup = True
  # How the full cache holds keys: "stored" = rotated once when written (plain generation never moves a key,
  # and long contexts skip a rotation pass over the cache every step); "slot" = the pre-RoPE cache that the
  # policy experiments use (same tokens, slower at long contexts on CPU).
  c.rope_mode = "stored"
  c.sampling = ml_collections.ConfigDict(dict(temperature=0.0, top_k=0, top_p=1.0))
  # Device mesh (lacax.sharding): shape () = one device; e.g. --config.mesh.shape="(1,8,1)" for FSDP over 8 chips,
  # "(1,1,8)" for tensor parallelism, "(-1,1,1)" for data parallelism over every device. `rules` overrides the
  # default logical-axis rules, e.g. --config.mesh.rules="batch=data,embed=".
  c.mesh = ml_collections.ConfigDict(dict(shape=(), axes=("data", "fsdp", "tensor"), rules=""))
  if arg == "sample":
    c.sampling.temperature, c.sampling.top_k, c.sampling.top_p = 0.7, 50, 0.9
  elif arg not in (None, ""):
    raise ValueError(f"configs/generate.py variant {arg!r} is unknown; expected '' or 'sample'")
  return c
