"""Regenerates (or checks) `kept_positions.json` by running the LaCache reference class unchanged.

  python -m tests.golden.lacache.generate --reference=/path/to/LaCache            # rewrite the JSON
  python -m tests.golden.lacache.generate --reference=/path/to/LaCache --check    # compare, exit 1 on a diff

`--reference` is a checkout of https://github.com/GATECH-EIC/LaCache (commit 0f27c33 for the committed data;
nothing of it is copied into lacax). The class `LaCache` is imported from the checkout's
`ppl/lacache/kv_cache.py` (streaming cases with 4 sinks, the ppl driver's hard-coded value),
`LongBench/lacache/kv_cache.py` (every other streaming case and the LongBench one-shot cases) or
`niah/lacache/kv_cache.py` (niah), and called exactly as the drivers call it, on a "cache" of torch tensors
whose values are the token positions: what `torch.gather` keeps in a layer is then the list of positions that
layer holds (and an out-of-range index fails in `torch.gather`, as in the reference). The call's own locals
(`startover`, `startover_times`) are read with a profile hook on its return, so no line of the reference is
restated. lacax is not imported: the planner is compared with this data, never used to produce it.

To extend the data, add a case to `STREAMING` or `ONESHOT` below and rerun; `tests/test_ladder.py` reads every
case of the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_OUT = os.path.join(_HERE, "kept_positions.json")
REFERENCE = {"repo": "GATECH-EIC/LaCache", "commit": "0f27c33", "file": "*/lacache/kv_cache.py (class LaCache)"}
ENCODING = ("kept[layer] = cumsum(rows_delta[layer_row[layer]]): original token positions each layer holds after "
            "the compaction call that follows `tokens` tokens; `cursor`, `cache_size_state`, `compacted` are the "
            "reference object's ladder_cursor, cache_size, compensation flag after that call.")

# Token-by-token streaming (ppl/run.py): (name, N, S, O, C, s, num_tokens, checkpoints = token counts).
STREAMING = (
    ("spec_1_2_N8_S4_O0_C16", 8, 4, 0, 16, 4, 40, (10, 16, 17, 18, 20, 21, 22, 24, 25, 26, 28, 29, 30, 40)),
    ("spec_1_2_N8_S4_O2_C24", 8, 4, 2, 24, 4, 28, (7, 14, 21, 24, 25, 26, 28)),
    ("N32_S16_O0_C256_s4", 32, 16, 0, 256, 4, 8193,
     (256, 257, 258, 476, 477, 478, 696, 697, 698, 916, 917, 918, 1025, 2048, 4096, 4097, 6145, 8193)),
    ("N32_S8_O4_C256_s4", 32, 8, 4, 256, 4, 2000,
     (256, 257, 258, 500, 813, 814, 815, 1000, 1368, 1369, 1370, 1500, 1923, 1924, 1925, 2000)),
    ("N32_S9_O3_C128_s4", 32, 9, 3, 128, 4, 1500,
     (128, 129, 130, 267, 268, 269, 375, 405, 406, 407, 543, 544, 545, 750, 1125, 1500)),
    ("N24_S9_O7_C200_s64", 24, 9, 7, 200, 64, 1500,
     (200, 201, 202, 290, 291, 292, 375, 378, 379, 380, 466, 467, 468, 750, 1125, 1500)),
    ("N30_S14_O0_C64_s1", 30, 14, 0, 64, 1, 1200,
     (64, 65, 66, 133, 134, 135, 201, 202, 203, 269, 270, 271, 300, 600, 900, 1200)),
    ("N8_S4_O0_C16_s4", 8, 4, 0, 16, 4, 1000, (16, 17, 18, 20, 21, 22, 24, 25, 26, 28, 29, 30, 250, 500, 750, 1000)),
    ("N8_S4_O2_C24_s4", 8, 4, 2, 24, 4, 1000, (24, 25, 26, 30, 31, 32, 36, 37, 38, 42, 43, 44, 250, 500, 750, 1000)),
    ("N24_S16_O0_C512_s64", 24, 16, 0, 512, 64, 2000,
     (500, 512, 513, 514, 936, 937, 938, 1000, 1360, 1361, 1362, 1500, 1784, 1785, 1786, 2000)),
    ("N30_S9_O7_C100_s4", 30, 9, 7, 100, 4, 1000,
     (100, 101, 102, 194, 195, 196, 250, 285, 286, 287, 376, 377, 378, 500, 750, 1000)),
    ("N32_S14_O0_C48_s1", 32, 14, 0, 48, 1, 1000, (48, 49, 50, 81, 82, 83, 113, 114, 115, 145, 146, 147, 250, 500, 750, 1000)),
    ("N24_S8_O4_C300_s1", 24, 8, 4, 300, 1, 1200, (300, 301, 302, 600, 715, 716, 717, 900, 1129, 1130, 1131, 1200)),
    ("N8_S3_O1_C20_s1", 8, 3, 1, 20, 1, 1000, (20, 21, 22, 33, 34, 35, 45, 46, 47, 57, 58, 59, 250, 500, 750, 1000)),
)

# One-shot (LongBench/pred.py, niah/pred.py): (name, N, S, O, protocol, budget, model_max_len, prompt length P,
# num_tokens, checkpoints). The prompt is one call; every later token is appended and followed by one call.
ONESHOT = (
    ("longbench_llama2_b0.5_S16_O0", 32, 16, 0, "longbench", 0.5, 3500, 3500, 3564, (3500, 3501, 3516, 3564)),
    ("longbench_llama2_b0.25_S9_O3", 32, 9, 3, "longbench", 0.25, 3500, 3500, 3564, (3500, 3501, 3516, 3564)),
    ("longbench_llama2_b0.1_S16_O0", 32, 16, 0, "longbench", 0.1, 3500, 3500, 3564, (3500, 3501, 3516, 3564)),
    ("longbench_smollm2_b0.25_S9_O7", 24, 9, 7, "longbench", 0.25, 7500, 7500, 7564, (7500, 7501, 7516, 7564)),
    ("longbench_short_prompt_S16_O0", 32, 16, 0, "longbench", 0.5, 3500, 1200, 1900, (1200, 1201, 1264, 1900)),
    ("niah_llama32_b0.5_S14_O0", 28, 14, 0, "niah", 0.5, None, 4000, 4064, (4000, 4001, 4016, 4064)),
)


def load_class(reference: str, driver: str):
  path = os.path.join(reference, driver, "lacache", "kv_cache.py")
  if not os.path.isfile(path):
    raise SystemExit(f"--reference={reference!r}: {path} does not exist; pass a GATECH-EIC/LaCache checkout")
  spec = importlib.util.spec_from_file_location(f"lacache_reference_{driver.lower()}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.LaCache


def ladder_shape(n: int, span: int, overlap: int) -> tuple[int, int, int]:
  """(B, A, R): the reference's `cache_size_per_ladder_before / _after / _can_reduce` (recorded, not used)."""
  b = 1 + math.ceil((n - span) / (span - overlap))
  a = min(math.ceil(span / (span - overlap)), b)
  return b, a, b - a


class _CallLocals:
  """The locals of the reference's `__call__` when it returns (a profile hook; the code runs unchanged)."""

  def __init__(self, cls):
    self.code, self.last = cls.__call__.__code__, {}

  def __enter__(self):
    def hook(frame, event, arg):
      del arg
      if event == "return" and frame.f_code is self.code:
        self.last = dict(frame.f_locals)
    sys.setprofile(hook)
    return self

  def __exit__(self, *exc):
    sys.setprofile(None)


def _encode(layers: list[np.ndarray]) -> tuple[list[int], list[list[int]]]:
  rows, layer_row = [], []
  for kept in layers:
    kept = [int(x) for x in kept]
    if kept not in rows:
      rows.append(kept)
    layer_row.append(rows.index(kept))
  return layer_row, [np.diff(r, prepend=0).tolist() for r in rows]


def run(cls, make, n: int, prefill_len: int, num_tokens: int, checkpoints) -> tuple[list, list, int]:
  """(checkpoint records, startover token counts after the prefill, startover_times of the prefill call)."""
  kv_cache = make()
  layers = [torch.arange(prefill_len, dtype=torch.long).view(1, 1, -1, 1) for _ in range(n)]
  records, startovers, prefill_passes = [], [], 0
  wanted = set(checkpoints)
  with _CallLocals(cls) as spy:
    for tokens in range(prefill_len, num_tokens + 1):
      if tokens > prefill_len:
        new = torch.full((1, 1, 1, 1), tokens - 1, dtype=torch.long)
        layers = [torch.cat([k, new], dim=2) for k in layers]
      spy.last = {}
      out = kv_cache([(k, k) for k in layers])
      layers = [k for k, _ in out]
      startover = bool(spy.last.get("startover", False))
      if tokens == prefill_len:
        prefill_passes = int(spy.last["startover_times"]) if startover else 0
      elif startover:
        startovers.append(tokens)
      if tokens in wanted:
        lengths = {k.shape[2] for k in layers}
        assert len(lengths) == 1, f"layers differ in length after {tokens} tokens: {lengths}"
        layer_row, rows_delta = _encode([k.view(-1).numpy() for k in layers])
        records.append({"tokens": tokens, "length": lengths.pop(), "cursor": int(kv_cache.ladder_cursor),
                        "cache_size_state": int(kv_cache.cache_size),
                        "compacted": bool(kv_cache.compensation_for_match_average_size),
                        "layer_row": layer_row, "rows_delta": rows_delta})
  return records, startovers, prefill_passes


def generate(reference: str) -> dict:
  classes = {d: load_class(reference, d) for d in ("ppl", "LongBench", "niah")}
  streaming = []
  for name, n, span, overlap, cache_size, start, num_tokens, checkpoints in STREAMING:
    if start == 4:  # the ppl driver's class, whose sinks are fixed at 4
      cls = classes["ppl"]
      make = lambda cls=cls: cls(cache_size=cache_size, span=span, overlap=overlap)  # noqa: E731
    else:
      cls = classes["LongBench"]
      make = lambda cls=cls: cls(cache_size=cache_size, start_size=start, span=span, overlap=overlap)  # noqa: E731
    records, startovers, _ = run(cls, make, n, 1, num_tokens, checkpoints)
    b, a, r = ladder_shape(n, span, overlap)
    streaming.append({"name": name, "num_layers": n, "span": span, "overlap": overlap, "cache_size": cache_size,
                      "start_size": start, "B": b, "A": a, "R": r, "prefill_len": 1, "num_tokens": num_tokens,
                      "startover_steps": startovers, "checkpoints": records})
  oneshot = []
  for name, n, span, overlap, protocol, budget, max_len, prompt_len, num_tokens, checkpoints in ONESHOT:
    if protocol == "longbench":  # LongBench/pred.py::greedy_generate, P = the prefilled length
      cache_size = int(budget * max_len)
      start = min(128, max(1, prompt_len - (n + 1)), cache_size - (n + 1))
    else:  # niah/pred.py: 64 tokens "reserved for questions/system instructions"
      cache_size, start = int(budget * prompt_len), 64
    cls = classes["LongBench" if protocol == "longbench" else "niah"]
    make = lambda cls=cls: cls(cache_size=cache_size, start_size=start, span=span, overlap=overlap)  # noqa: E731
    records, startovers, passes = run(cls, make, n, prompt_len, num_tokens, checkpoints)
    b, a, r = ladder_shape(n, span, overlap)
    oneshot.append({"name": name, "num_layers": n, "span": span, "overlap": overlap, "cache_size": cache_size,
                    "start_size": start, "B": b, "A": a, "R": r, "protocol": protocol, "budget": budget,
                    "model_max_len": max_len, "prefill_len": prompt_len, "num_tokens": num_tokens,
                    "startover_steps": startovers, "prefill_passes": passes, "checkpoints": records})
  return {"reference": REFERENCE, "encoding": ENCODING, "streaming": streaming, "oneshot": oneshot}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reference", required=True, help="path of a GATECH-EIC/LaCache checkout")
  parser.add_argument("--out", default=_OUT, help="the JSON file to write or check")
  parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
  args = parser.parse_args(argv)
  data = generate(args.reference)
  if args.check:
    with open(args.out) as f:
      committed = json.load(f)
    if committed != data:
      names = [c["name"] for kind in ("streaming", "oneshot") for c, d in zip(committed.get(kind, []), data[kind])
               if c != d]
      print(f"{args.out} differs from the reference's output: {names or 'top-level fields or case lists'}")
      return 1
    print(f"{args.out} matches the reference ({len(data['streaming'])} streaming, {len(data['oneshot'])} one-shot)")
    return 0
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, separators=(",", ":"))
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
