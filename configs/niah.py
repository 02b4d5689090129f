"""Needle in a haystack (NIAH) in real prose: full cache vs StreamingLLM vs LaCache at one budget.

  python -m experiments.run --config=configs/niah.py:cpu
  python -m experiments.run --config=configs/niah.py --config.model.path=/models/Llama-3.2-3B-Instruct \
      --config.haystack.path=/data/paul_graham_essays/

A RULER-style single needle ("The special magic number is: 1234567.") is inserted into prose at a depth measured
in tokens (as kvpress and RULER do), the haystack continuing after it, and the model is asked for the number
(`lacax/jobs/passkey.py`, task "niah"). The cache protocol is LaCache's `niah/pred.py`: full prefill, one
compaction to C = int(budget * prompt tokens), greedy decode compacting after every token, pass when the number
is in the output. LaCache uses `LadderPolicy.for_prefill(protocol="niah")` (64 sinks); StreamingLLM keeps
`cache.start_size` (4) sinks + C - start_size recent tokens.

The haystack: `haystack.path` = "" is the English prose that ships with Python (`pydoc_data.topics`, about 110k
tokens); the usual haystack is Paul Graham's essays (a folder of .txt files, concatenated in name order) or any
book. The haystack always starts at its beginning, so every prompt of a length shares its filler and only the
needle's position and number change.

Variants:
  ""     the LaCache paper's NIAH setting (Llama-3.2-3B-Instruct, span 14, overlap 0, budget 0.5, 16k..128k in
         steps of 16k, 11 depths, 50 needles per cell); the embedded SmolLM2 has an 8k context, use
         --config.model.path for a long-context model and --config.haystack.path for a text of >= 128k tokens.
  "cpu"  SmolLM2-135M (embedded), lengths 512 / 1024, depths 0 / 25 / 50 / 75 / 100%, 2 needles per cell.
  "kvpress", "kvpress_cpu"   the same grids with kvpress's needle_in_haystack protocol (`grid.protocol`):
         the haystack cut to length - needle - 150 tokens, the needle inserted at int(depth * haystack tokens),
         wrapped as "This is a very long story book: <book> ... </book>.", the chat template applied; kvpress's
         ROUGE against the needle is recorded beside the pass rate. The compression differs from kvpress's
         pipeline, which compresses the context only and appends the question afterwards (query-agnostic):
         lacax compresses the whole prompt once after prefill, i.e. kvpress's `query_aware=True`.
"""

import ml_collections

from configs import passkey
from lacax.eval import needle_grid


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = passkey.get_config("cpu" if arg in ("cpu", "kvpress_cpu") else None)
  if arg not in (None, "", "cpu", "kvpress", "kvpress_cpu"):
    raise ValueError(f"configs/niah.py variant {arg!r} is unknown; expected '', 'cpu', 'kvpress' or 'kvpress_cpu'")
  c.experiment = "niah"
  c.task = "niah"
  c.grid.depth_unit = "tokens"
  c.grid.suffix_mode = "continue"
  c.haystack = ml_collections.ConfigDict(dict(path="", field="text", encoding="utf-8"))
  # task_description (first line), template (the needle, with {answer}), question (last line), digits.
  c.needle = ml_collections.ConfigDict(dict(needle_grid.NIAH_DEFAULTS))
  # "lacache" (the LaCache driver's fitting) or "kvpress" (kvpress's needle_in_haystack prompt construction)
  c.grid.protocol = "kvpress" if arg in ("kvpress", "kvpress_cpu") else "lacache"
  if c.grid.protocol == "kvpress":
    c.chat = True  # kvpress's pipeline applies the chat template when the tokenizer has one
  return c
