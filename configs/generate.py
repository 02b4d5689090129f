"""Generate text from the embedded default model (SmolLM2-135M-Instruct) or any checkpoint.

  python -m experiments.run --config=configs/generate.py --config.prompt="Why is the sky blue?"
  python -m experiments.run --config=configs/generate.py:sample --config.model.path=/path/to/Llama-3-8B
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "generate"
  c.results_dir = "results"
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  c.prompt = "What is a KV cache in a transformer? Answer in two sentences."
  c.chat = True
  c.max_new_tokens = 64
  c.stop_at_eos = True
  c.seed = 0
  c.warmup = True
  c.sampling = ml_collections.ConfigDict(dict(temperature=0.0, top_k=0, top_p=1.0))
  if arg == "sample":
    c.sampling.temperature, c.sampling.top_k, c.sampling.top_p = 0.7, 50, 0.9
  elif arg not in (None, ""):
    raise ValueError(f"configs/generate.py variant {arg!r} is unknown; expected '' or 'sample'")
  return c
