"""llama.cpp's decode and prefill speed on a GGUF, for `bench_decode --llama_cpp_python=...`.

Runs in a Python that has `llama-cpp-python` (its vendored llama.cpp); it imports nothing from lacax, so it
works in a separate virtual environment. Reads a JSON request {"model", "prompts": {context: [token ids]},
"new_tokens", "repeats", "threads", "flash_attn": [false, true], "types": ["F32", "Q4_1", ...]} from argv[1]
and writes a list of runs to argv[2]. Each of `types` (absent: the file as it is) is the model file converted
by llama.cpp's own `llama_model_quantize` (with requantization allowed: from a Q4_1 file, F32 / F16 / BF16 hold
exactly its dequantized values, the weights lacax's float rows load) into a temporary directory. Per (type,
flash attention, context): the best decode time over `repeats` (after a warm-up), counted as lacax
counts it: the first generated token comes from the prefill, so (new_tokens - 1) tokens over the decode time.
Decoding is greedy on llama.cpp's own logits (of the last position, `llama_get_logits_ith`), one `eval` per
token.
"""

import ctypes
import json
import os
import sys
import tempfile
import time

# llama.cpp's `llama_ftype` values of the types this worker converts to.
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}


def convert(llama_cpp, source: str, kind: str, folder: str, threads: int) -> str:
  """`source` converted to `kind` by llama.cpp (a file in `folder`)."""
  if kind not in FTYPES:
    raise ValueError(f"types: {kind!r} is not one of {sorted(FTYPES)}")
  out = os.path.join(folder, f"model-{kind}.gguf")
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = FTYPES[kind]
  params.allow_requantize = True
  params.nthread = threads
  if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
    raise RuntimeError(f"llama_model_quantize failed converting {source} to {kind}")
  return out


def main(request_path: str, out_path: str) -> None:
  import llama_cpp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  with open(request_path) as f:
    req = json.load(f)
  prompts = {int(c): ids for c, ids in req["prompts"].items()}
  n_ctx = max(prompts) + req["new_tokens"] + 8
  runs = []
  with tempfile.TemporaryDirectory() as folder:
    for kind in req.get("types") or [None]:
      path = req["model"] if kind is None else convert(llama_cpp, req["model"], kind, folder, req["threads"])
      for flash in req["flash_attn"]:
        runs.extend(measure(llama_cpp, np, path, kind, flash, prompts, n_ctx, req))
      if kind is not None:
        os.remove(path)
  with open(out_path, "w") as f:
    json.dump(runs, f, indent=1)


def last_argmax(llama_cpp, np, llm) -> int:
  """The greedy token of the last evaluated position, read from llama.cpp's logits (`Llama.scores` is not
  filled without logits_all in llama-cpp-python 0.3.x)."""
  logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
  return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


def measure(llama_cpp, np, path, kind, flash, prompts, n_ctx, req) -> list[dict]:
  """The runs of one model file and flash-attention setting, one per context."""
  runs = []
  llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=req["threads"],
                        n_threads_batch=req["threads"], flash_attn=flash, verbose=False)
  for context, ids in sorted(prompts.items()):
    best_decode, prefill, tokens = None, [], None
    for _ in range(req["repeats"] + 1):  # the first run warms up
      llm.reset()
      start = time.perf_counter()
      llm.eval(ids)
      mid = time.perf_counter()
      generated = []
      token = last_argmax(llama_cpp, np, llm)
      for _ in range(req["new_tokens"] - 1):
        generated.append(token)
        llm.eval([token])
        token = last_argmax(llama_cpp, np, llm)
      generated.append(token)
      end = time.perf_counter()
      if best_decode is None or end - mid < best_decode:
        best_decode, tokens = end - mid, generated
      prefill.append(mid - start)
    prefill = prefill[1:]
    runs.append({"impl": "llama.cpp", "type": kind or "file", "flash_attn": flash, "context": context,
                 "threads": req["threads"], "model_bytes": os.path.getsize(path),
                 "llama_cpp_python": llama_cpp.__version__,
                 "decode_tokens_per_second": (req["new_tokens"] - 1) / best_decode,
                 "prefill_tokens_per_second": context / min(prefill), "prefill_seconds": prefill,
                 "tokens": tokens})
    print(f"llama.cpp {kind or 'file'} flash_attn={flash} ctx={context}: decode "
          f"{runs[-1]['decode_tokens_per_second']:.2f} tok/s", flush=True)
  del llm
  return runs


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
