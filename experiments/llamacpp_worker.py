"""llama.cpp's decode and prefill speed on a GGUF, for `bench_decode --llama_cpp_python=...`.

Runs in a Python that has `llama-cpp-python` (its vendored llama.cpp); it imports nothing from lacax, so it
works in a separate virtual environment. Reads a JSON request {"model", "prompts": {context: [token ids]},
"new_tokens", "repeats", "threads", "flash_attn": [false, true]} from argv[1] and writes a list of runs to
argv[2]: per (flash attention, context) the best decode time over `repeats` (after a warm-up), counted as lacax
counts it: the first generated token comes from the prefill, so (new_tokens - 1) tokens over the decode time.
Decoding is greedy on llama.cpp's own logits, one `eval` per token.
"""

import json
import sys
import time


def main(request_path: str, out_path: str) -> None:
  import llama_cpp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  with open(request_path) as f:
    req = json.load(f)
  prompts = {int(c): ids for c, ids in req["prompts"].items()}
  n_ctx = max(prompts) + req["new_tokens"] + 8
  runs = []
  for flash in req["flash_attn"]:
    llm = llama_cpp.Llama(model_path=req["model"], n_ctx=n_ctx, n_batch=512, n_threads=req["threads"],
                          n_threads_batch=req["threads"], flash_attn=flash, verbose=False)
    for context, ids in sorted(prompts.items()):
      best_decode, prefill, tokens = None, [], None
      for _ in range(req["repeats"] + 1):  # the first run warms up
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        mid = time.perf_counter()
        generated = []
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(req["new_tokens"] - 1):
          generated.append(token)
          llm.eval([token])
          token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        end = time.perf_counter()
        if best_decode is None or end - mid < best_decode:
          best_decode, tokens = end - mid, generated
        prefill.append(mid - start)
      prefill = prefill[1:]
      runs.append({"impl": "llama.cpp", "flash_attn": flash, "context": context, "threads": req["threads"],
                   "llama_cpp_python": llama_cpp.__version__,
                   "decode_tokens_per_second": (req["new_tokens"] - 1) / best_decode,
                   "prefill_tokens_per_second": context / min(prefill), "prefill_seconds": prefill,
                   "tokens": tokens})
      print(f"llama.cpp flash_attn={flash} ctx={context}: decode {runs[-1]['decode_tokens_per_second']:.2f} tok/s",
            flush=True)
    del llm
  with open(out_path, "w") as f:
    json.dump(runs, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
