"""The main job: streaming perplexity of the full cache, StreamingLLM and LaCache at the same budget.

  python -m experiments.run --config=configs/lacache.py
  python -m experiments.run --config=configs/lacache.py:paper --config.model.path=/models/Meta-Llama-3-8B
  python -m experiments.run --config=configs/lacache.py --config.cache.size=512 --config.num_tokens=4096

Variants: "" (default: SmolLM2-135M, 1024 tokens, budget 256: about 4-5 minutes on 2 CPU cores), "cpu" (a quick
smoke run),
"paper" (the LaCache README's perplexity setting: cache 256, span 16, overlap 0, 1024 tokens... for 32-layer
Llama; use --config.num_tokens=8192 and --config.cache.size=512 for the long run).
"""

import ml_collections

from lacax.cache import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "lacache"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  # "" = English prose shipped with Python (pydoc_data.topics); or a text file, a folder of *.txt, a .jsonl.
  c.data = ml_collections.ConfigDict(dict(path="", field="text", encoding="utf-8"))
  c.num_tokens = 1024
  c.report_at = (256, 512, 1024, 2048, 4096, 8192)
  c.chunk = 256
  c.policies = ("full", "streaming", "lacache")
  # One budget for every policy: StreamingLLM keeps start_size sinks + (size - start_size) recent tokens. The
  # other fields (start_size, span, overlap, layer_mapping, score_agg, window, ...) take the policies' own
  # defaults, read from their dataclasses by the registry.
  c.cache = ml_collections.ConfigDict(dict(size=256, **registry.cache_defaults()))
  # Device mesh (lacax.sharding): shape () = one device; e.g. --config.mesh.shape="(1,8,1)" for FSDP over 8 chips,
  # "(1,1,8)" for tensor parallelism, "(-1,1,1)" for data parallelism over every device. `rules` overrides the
  # default logical-axis rules, e.g. --config.mesh.rules="batch=data,embed=".
  c.mesh = ml_collections.ConfigDict(dict(shape=(), axes=("data", "fsdp", "tensor"), rules=""))
  if arg == "cpu":
    c.num_tokens = 512
    c.cache.size = 128
  elif arg == "paper":
    c.num_tokens = 1024
  elif arg not in (None, ""):
    raise ValueError(f"configs/lacache.py variant {arg!r} is unknown; expected '', 'cpu' or 'paper'")
  return c
