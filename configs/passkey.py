"""Passkey retrieval on a (context length x needle depth) grid: full cache vs StreamingLLM vs LaCache.

  python -m experiments.run --config=configs/passkey.py:cpu          # SmolLM2-135M, a few minutes on 2 CPU cores
  python -m experiments.run --config=configs/passkey.py --config.model.path=/models/Llama-3.2-3B-Instruct

The protocol of GATECH-EIC/LaCache `niah/pred.py` (see `lacax/jobs/passkey.py`): the landmark passkey prompt,
fitted to `grid.lengths` tokens with the needle at `grid.depths` of the filler (in characters, as the
reference); full prefill, one compaction to C = int(budget * prompt tokens), greedy decode with compaction after
every token; a sample passes when the passkey string is in the output. Every policy gets the same C:

  lacache    `LadderPolicy.for_prefill(protocol="niah")`: cache_size C, 64 sinks ("reserved for questions /
             system instructions" in the reference), `cache.span` / `cache.overlap`;
  streaming  StreamingLLM with `cache.start_size` sinks (4, the StreamingLLM paper's) + C - start_size recent
             tokens; --config.cache.start_size=64 gives it LaCache's sink count instead;
  full       no eviction.

Decode length: len(answer tokens without BOS) + `extra_new_tokens` (1). The reference decodes
len(tokenizer(answer).input_ids) tokens, which for the Llama tokenizers it ran counts the BOS, i.e. answer + 1;
the +1 also leaves room for the separate space token that byte-level BPE models such as SmolLM2 emit before the
digits (" 50495" is 6 tokens), without which every answer would be cut short.

Variants:
  ""     the paper's NIAH setting (LaCache README: Llama-3.2-3B-Instruct, span 14, overlap 0, budget 0.5,
         max_tokens 131072, interval 16384 -> 8 lengths 16k..128k, depths 0..100% in steps of 10%, 50 tests per
         cell). Lengths are exact token budgets here; the reference sets the filler in characters
         (3.75 chars/token) and rounds the measured token count. The embedded SmolLM2 has an 8k context: use
         --config.model.path for a long-context model.
  "cpu"  SmolLM2-135M (embedded), lengths 512 / 1024, depths 0 / 25 / 50 / 75 / 100%, 2 samples per cell.
  "ref"  niah/pred.py's own defaults (max_tokens 4096, interval 2948: one length of ~2.7k tokens, 11 depths,
         5 tests per cell).
"""

import ml_collections

from lacax.cache import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "passkey"
  c.task = "passkey"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  c.grid = ml_collections.ConfigDict(dict(
      lengths=tuple(16384 * k for k in range(1, 9)),
      depths=tuple(i / 10 for i in range(11)),
      samples_per_cell=50,
      seed=0,                 # seeds seed .. seed + samples_per_cell - 1 in every cell, as the reference
      depth_unit="chars",     # "chars" (reference) or "tokens"
      suffix_mode="restart",  # "restart" (reference: the filler restarts after the needle) or "continue"
  ))
  c.chat = False  # the reference feeds the raw prompt, even to Instruct models
  c.extra_new_tokens = 1
  c.batch_size = 1  # prompts of one length are batched; the prefill attention is [batch, heads, L, L]
  c.policies = ("full", "streaming", "lacache")
  # budget: fraction of the prompt every compacting policy keeps; the other fields as in configs/lacache.py.
  c.cache = ml_collections.ConfigDict(dict(budget=0.5, **{**registry.cache_defaults(), "span": 14}))
  if arg == "cpu":
    c.grid.lengths = (512, 1024)
    c.grid.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    c.grid.samples_per_cell = 2
    c.batch_size = 5
  elif arg == "ref":
    c.grid.lengths = (2700,)
    c.grid.samples_per_cell = 5
  elif arg not in (None, ""):
    raise ValueError(f"configs/passkey.py variant {arg!r} is unknown; expected '', 'cpu' or 'ref'")
  return c
