"""StreamingLLM alone: token-by-token streaming perplexity of attention sinks + a recent window vs the full cache.

  python -m experiments.run --config=configs/streaming.py            # SmolLM2-135M, cache 256 (4 + 252)
  python -m experiments.run --config=configs/streaming.py:cpu        # a quick smoke run
  for size in 256 512 1024 2048; do                                   # the cache-size sweep
    python -m experiments.run --config=configs/streaming.py:$size; done

The main job (`lacax/jobs/lacache.py`) with only the full cache and StreamingLLM: the protocol of StreamingLLM's
`examples/eval_long_ppl.py` (one token at a time from an empty cache, NLL of the next token, evict after every
step; PPL = exp(mean NLL)), keys rotated at their cache slot (the `pos_shift` patch). StreamingLLM keeps
`cache.start_size` sinks + `cache.size - start_size` recent tokens.

Paper settings (StreamingLLM, arXiv 2309.17453): 4 attention sinks; a 1024-token cache (4 + 1020) for the
sink ablation and cache sizes from 256 to 2048 (4 + 252 ... 4 + 2044) for the cache-size study, on the
concatenated PG19 test set (long runs: `--config.data.path=/data/pg19/ --config.num_tokens=20000`). The
script's own defaults are 1 sink + 255 recent. LaCache compares against 4 + 252 at cache 256.

Variants (comma-separated): "" (cache 256, 2048 tokens), "cpu" (cache 128, 512 tokens), or a cache size
("256", "512", "1024", "2048"; the number of tokens becomes 4 x the cache, at least 2048).
"""

import ml_collections

from configs import lacache


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "").split(",") if p]
  c = lacache.get_config("cpu" if "cpu" in parts else None)
  c.policies = ("full", "streaming")
  for part in parts:
    if part == "cpu":
      continue
    if not part.isdigit() or int(part) < 8:
      raise ValueError(f"configs/streaming.py variant {part!r} is unknown; expected 'cpu' or a cache size >= 8 "
                       "such as '512'")
    c.cache.size = int(part)
    if "cpu" not in parts:
      c.num_tokens = max(2048, 4 * c.cache.size)
  return c
