"""Decode and prefill speed of lacax vs transformers (PyTorch) on the same weights, machine and run.

  python -m experiments.bench_decode [--contexts=512,4096] [--new_tokens=32] [--dtypes=float32,bfloat16]
                                    [--rope_modes=slot,stored] [--cpu_kernel=on,off]
                                    [--weights=dense,int8,int4,q4_1] [--quant_kernel=on,off] [--kv_bits=16,8]
  python -m experiments.bench_decode --dtypes=float32,bfloat16 --weights=dense --rope_modes=slot --torch=false \
      --llama_cpp_python=<venv>/bin/python --llama_cpp_types=F32,F16,BF16 --rounds=3   # lacax vs llama.cpp
  python -m experiments.bench_decode --contexts=512,4096,8192 --dtypes=float32 --rope_modes=slot \
      --new_tokens=2 --repeats=3                 # prefill speed (both sides: the best of 3, every time kept)

For each context length C: a C-token prompt is prefilled, then `new_tokens` tokens are decoded greedily
with the full cache, once per key storage (`--rope_modes`: "slot" = the pre-RoPE cache of DESIGN.md,
rotated every step; "stored" = keys cached post-RoPE, `FullPolicy(rope_mode="stored")`) and, with
`--cpu_kernel=on,off`, with and without the XLA:CPU decode-attention kernel (rows marked "/jnp" use the
pure-JAX attention). lacax runs its compiled prefill and its compiled decode loop
(compiled once before timing); transformers runs the model's forward with its own KV cache (a
`past_key_values` loop, which is what `generate` does, without its per-step logits processing), in a separate
process, with the faster of `--torch_threads`. Reports tokens/s, the lacax/transformers ratio, and the
achieved memory bandwidth: (weight bytes + KV bytes read per token) x tokens/s.

`--weights` adds rows with packed low-bit layer projections: int8 per channel and int4 in groups of 32
(lacax's symmetric quantizer, `lacax.compress.packed.compress_layers`), with the tied embedding / LM head
packed alike (`--pack_head`, default on: int8 / int4 in groups of 32, `packed.compress_head`), and q4_1 (the
GGUF's own tensors kept as codes, `load_model(keep_quantized=True)`: Q4_1 layers and its Q8_0 embedding), and
sparse (every layer projection magnitude-pruned to `--sparsity`, default 0.5, then stored by
`compress_layers(storage="sparse")`: int8 `SparseWeight`s, the non-zero codes and a bit mask, where that is
smaller than packed int8; a speed row only, no calibration, so its perplexity means nothing).
`--quant_kernel=on,off` measures every row with and without the XLA:CPU weight kernels of
`lacax.model.cpu_quant_matmul`: packed rows marked "/dequant" have XLA dequantize every step; float rows
marked "/xla" multiply by XLA's dot instead of the weight-streaming kernel.
`--kv_bits=16,8` measures every row with the model's float cache (16: its dtype, float32 or bfloat16) and
with an int8 KV cache (per-token scales, `lacax.cache.int8`; rows marked "/kv=int8", which the decode-attention
kernel reads one byte per element). The decode targets judge the float-cache rows; an int4 row with an int8
cache is judged beside them against the same lacax float32 row (float32 cache).
`--llama_cpp_python=<python>` adds llama.cpp rows on the same GGUF and prompts, converted by llama.cpp itself
to each of `--llama_cpp_types` (default F32, F16, BF16, Q8_0, Q4_1; from the embedded Q4_1 file the float
types hold exactly the dequantized weights lacax's float rows load), flash attention off and on, all cores,
measured by `experiments/llamacpp_worker.py` in that Python (a venv with `pip install llama-cpp-python`, which
builds its vendored llama.cpp from source: PyPI has no Linux wheel).

`--interleave` prefills and compiles every lacax row once and then times one decode of each per round, the
rows seconds apart (a round of whole `generate` calls takes minutes at 4096 tokens): for the targets between
lacax's own rows on a drifting host.
`--rounds=N` measures every lacax row and then every llama.cpp row N times over, alternating: on a shared
machine whose memory bandwidth drifts (a 2-core EPYC's bfloat16 decode moved between 58 and 85 tok/s from one
run to the next), both sides then meet the same drift instead of one side the quiet minute and the other the
busy one. Each row reports its best round and keeps every round's rate (`round_rates`). The run ends with the
decode targets judged from those rates (`experiments.decode_targets`: lacax at each precision against
llama.cpp's best at the matching one, bfloat16 against 1.7x and int4 against 2.5x lacax float32), by the
median over rounds of the ratio within a round; JSON `targets`.

Decode tokens/s count the same thing on every side: the first generated token comes from the prefill, so
(new_tokens - 1) tokens over the decode time. "GB/s" is (weight bytes + KV bytes read per token) x tokens/s
(llama.cpp: the model file's bytes and a float16 cache), reported beside a measured read ceiling (`--ceiling`:
torch's all-core sum over a 1 GiB float32 array, the best of 5; numpy's single-thread sum without
torch). lacax's weights are on transparent huge pages where the host allows it (`load_model` and every packed
variant here, `lacax.memory.back_with_huge_pages`); each row records the bytes collapsed and the
process's AnonHugePages (`LACAX_HUGEPAGES=0` measures without).
Writes `results/bench_decode/<timestamp>.json` (with the CPU model) and prints a table.

  python -m experiments.bench_decode --policies=streaming,snapkv,pyramidkv,kvmerger --budget=256 \
      --contexts=2048 --new_tokens=64 --dtypes=float32 --torch=false

With `--policies`: decode tokens/s of registered cache policies at one budget (`cache.size = --budget`) after
a prefill of each context, side by side in one run. Every prompt compressor (SnapKV, PyramidKV, KVMerger) is
measured twice (prefilled once each, then timed decodes round-robin over all variants: see `policy_runs`):
"after" = as `lacax.generate` runs it now (decode cache = kept prompt + generated tokens,
`run_capacity`; lean decode cache: no scores recorded, keys stored rotated, the CPU kernel serves decode) and
"before" = the behaviour before that fix (decode cache sized for the whole run, `lean_decode=False`: scores
recorded at every decode step, keys rotated at their original positions every step, no kernel). Reports each
policy's decode speed relative to StreamingLLM's in the same run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import decode_targets
from lacax import generate as generation
from lacax import memory
from lacax import results as results_lib
from lacax.cache import int8 as int8_kv
from lacax.cache.full import FullPolicy
from lacax.compress import calibrate
from lacax.compress import packed
from lacax.compress import prune
from lacax.model import cpu_attention
from lacax.model import cpu_quant_matmul
from lacax.weights.loader import default_model_path
from lacax.weights.loader import load_model

_CONTEXTS = flags.DEFINE_list("contexts", ["512", "4096"], "Prompt lengths.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Tokens decoded per measurement.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "lacax dtypes to measure.")
_ROPE_MODES = flags.DEFINE_list("rope_modes", ["slot", "stored"], "Full-cache key storage modes to measure.")
_CPU_KERNEL = flags.DEFINE_list(
    "cpu_kernel", ["on"], "on: decode attention through the XLA:CPU kernel where it applies; off: the "
    "pure-JAX formulation (lacax.model.cpu_attention). Both: one row each.")
_WEIGHTS = flags.DEFINE_list(
    "weights", ["dense"], "dense: the model's float weights; int8 / int4: layer projections packed per channel / "
    "in groups of 32; q4_1: the GGUF's Q4_1 tensors kept as codes; sparse: layer projections magnitude-pruned "
    "to --sparsity and stored as int8 SparseWeights (see above). One row each.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "--weights=sparse: the fraction of each projection pruned.")
_QUANT_KERNEL = flags.DEFINE_list(
    "quant_kernel", ["on"], "on: packed weights multiply through the XLA:CPU low-bit matmul kernel; off: XLA "
    "dequantizes them every step (lacax.model.cpu_quant_matmul). Both: one row each.")
_KV_BITS = flags.DEFINE_list(
    "kv_bits", ["16"], "16: the cache in the model's dtype; 8: an int8 KV cache with per-token scales "
    "(lacax.cache.int8). Both: one row each.")
_MODEL = flags.DEFINE_string("model", "", "Model path (default: the embedded SmolLM2-135M-Instruct GGUF).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repetitions (the best is reported).")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Measure every lacax row and then every llama.cpp row this many times over, alternating, so "
    "that a shared machine's drifting memory bandwidth falls on both sides alike; each row reports its best "
    "round and keeps every round's rate (`round_rates`).")
_INTERLEAVE = flags.DEFINE_bool(
    "interleave", False, "Prefill and compile every lacax row once, then time one decode of each row per round "
    "(`--rounds`), the rows seconds apart (and llama.cpp's rows after them), instead of a whole generate per row "
    "and round: on a host whose bandwidth drifts within minutes, the ratios between lacax rows then compare the "
    "same minute. Needs --cpu_kernel=on and --quant_kernel=on (the kernel choice is made at trace time).")
_TORCH = flags.DEFINE_bool("torch", True, "Also measure transformers.")
_OUT = flags.DEFINE_string("out", "results/bench_decode", "Output folder.")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["0", "1"],
                                   "torch thread counts to try (0 = torch's default); the fastest is the baseline.")
_POLICIES = flags.DEFINE_list("policies", [], "Registered cache policies to compare at --budget (see above).")
_BUDGET = flags.DEFINE_integer("budget", 256, "cache.size for --policies.")
_LLAMA_CPP_PYTHON = flags.DEFINE_string(
    "llama_cpp_python", "", "A Python with llama-cpp-python installed: adds llama.cpp rows on the same GGUF "
    "(flash attention off and on, all cores), measured by experiments/llamacpp_worker.py in that Python.")
_LLAMA_CPP_TYPES = flags.DEFINE_list(
    "llama_cpp_types", ["F32", "F16", "BF16", "Q8_0", "Q4_1"], "GGUF types llama.cpp is measured at (each "
    "converted from --model by llama.cpp's own quantizer); empty: the file as it is.")
_PACK_HEAD = flags.DEFINE_bool("pack_head", True, "int8 / int4 rows: pack the LM head (tied embedding) too.")
_CEILING = flags.DEFINE_bool("ceiling", True, "Measure the read-bandwidth ceiling (see above).")
_TORCH_ONLY_JSON = flags.DEFINE_string("torch_only_json", "", "Internal: measure transformers only, write JSON here.")


def _prompt(context: int, vocab: int) -> list[int]:
  return np.random.RandomState(context).randint(10, min(vocab, 30000), context).tolist()


# --weights: (bits, group size) of lacax's quantizer; q4_1 is read from the GGUF instead.
_PACKED = {"int8": (8, None), "int4": (4, 32)}


def with_weights(model, weights: str, dtype: str):
  """`model` with its layer projections as `--weights` asks (dense: unchanged)."""
  if weights == "dense":
    return model
  if weights == "q4_1":
    return load_model(_MODEL.value or None, dtype=dtype, keep_quantized=True)
  if weights not in _PACKED and weights != "sparse":
    raise ValueError(f"--weights: got {weights!r}, expected dense, int8, int4, q4_1 or sparse")
  L = model.cfg.num_layers
  if weights == "sparse":  # speed, not quality: magnitude pruning, no calibration
    if not 0.0 < _SPARSITY.value < 1.0:
      raise ValueError(f"--sparsity: got {_SPARSITY.value}, expected a fraction in (0, 1)")
    layers = dict(model.params["layers"])
    for name in calibrate.PROJECTIONS:
      w = layers[name]
      k = int(np.prod(w.shape[1:1 + calibrate.num_input_axes(name)]))
      flat = w.reshape(L, k, -1)
      layers[name] = jnp.stack([prune.magnitude(flat[l], jnp.float32(_SPARSITY.value)) for l in range(L)]
                               ).reshape(w.shape)
    bits = 8
    layers = packed.compress_layers(layers, [bits] * L, [None] * L, storage="sparse")
    kinds = {type(w).__name__ for seg in (layers if isinstance(layers, list) else [layers])
             for name, w in seg.items() if name in calibrate.PROJECTIONS}
    print(f"--weights=sparse: projections stored as {sorted(kinds)}", flush=True)
  else:
    bits, group = _PACKED[weights]
    layers = packed.compress_layers(model.params["layers"], [bits] * L, [None] * L, storage="packed",
                                    group_size=group)
  params = {**model.params, "layers": layers}
  if _PACK_HEAD.value:
    params = packed.compress_head(params, model.cfg.tie_word_embeddings, bits, group_size=32)
  return dataclasses.replace(model, params=params)


def read_ceiling() -> dict:
  """The machine's read bandwidth: the best of 5 sums over a 1 GiB float32 array (torch, all cores, where
  installed; else numpy on one core)."""
  n = 1 << 28
  try:
    import torch  # pylint: disable=g-import-not-at-top

    x, how = torch.ones(n, dtype=torch.float32), f"torch.sum, {torch.get_num_threads()} threads"
  except ImportError:
    x, how = np.ones(n, np.float32), "numpy.sum, 1 thread"
  x.sum()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    x.sum()
    best = min(best, time.perf_counter() - start)
  return {"GBps": n * 4 / best / 1e9, "how": how}


def bench_lacax(model, context: int, new_tokens: int, repeats: int, rope_mode: str = "slot",
                kv_bits: int | None = None) -> dict:
  prompt = [_prompt(context, model.cfg.vocab_size)]
  kwargs = dict(max_new_tokens=new_tokens, policy=_row_policy(rope_mode, kv_bits), bucket=128)
  generation.generate(model.params, model.cfg, prompt, **kwargs)  # compile
  best, prefill_seconds = None, []
  for _ in range(repeats):
    r = generation.generate(model.params, model.cfg, prompt, **kwargs)
    prefill_seconds.append(r.prefill_seconds)
    if best is None or r.decode_seconds < best.decode_seconds:
      best = r
  # The first generated token comes from the prefill: (tokens - 1) decode steps, as the other sides count.
  decode_rate = (best.generated_tokens - len(prompt)) / max(best.decode_seconds, 1e-9)
  return {
      "decode_tokens_per_second": decode_rate,
      # The best prefill of the repeats, as for transformers (each repeat's time is kept: the spread).
      "prefill_tokens_per_second": context / min(prefill_seconds),
      "prefill_seconds": prefill_seconds,
      "bandwidth_GBps": _bytes_per_step(model, context, new_tokens, kv_bits) * decode_rate / 1e9,
      "tokens": best.tokens[0],
  }


def _row_policy(rope_mode: str, kv_bits: int | None):
  """A row's cache: the full cache with keys stored as `rope_mode` says, int8 for kv_bits=8."""
  return int8_kv.with_kv_bits(FullPolicy(rope_mode=rope_mode), kv_bits)


def _bytes_per_step(model, context: int, new_tokens: int, kv_bits: int | None) -> float:
  """The bytes a decode step reads: every weight, and the cache at the run's mean length."""
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
  kv_per_token = model.cfg.kv_bytes_per_token()
  if kv_bits == 8:  # one byte per element and a float32 scale per token and head
    kv_per_token = model.cfg.kv_bytes_per_token(1) * (1 + 4 / model.cfg.head_dim)
  return weight_bytes + kv_per_token * (context + new_tokens / 2)


@dataclasses.dataclass
class _PrefilledRow:
  """A lacax row of `--interleave`: prefilled and compiled once, its decode timed once per round."""
  model: object
  state: object
  statics: dict
  kv_bits: int | None
  fields: dict  # the run's fields other than the decode measurement


def prefilled_row(model, context: int, new_tokens: int, repeats: int, rope_mode: str, kv_bits: int | None,
                  fields: dict) -> _PrefilledRow:
  """The prefill of a row's prompt, timed `repeats` times after a compiling one (the best is reported), and its
  decode loop compiled."""
  policy = _row_policy(rope_mode, kv_bits)
  capacity = policy.run_capacity(model.cfg, context, new_tokens)  # as lacax.generate sizes it
  seconds = []
  for _ in range(1 + repeats):
    start = time.perf_counter()
    state, statics = _policy_state(model, policy, context, new_tokens, capacity)
    seconds.append(time.perf_counter() - start)
  _time_decode(model, state, statics)  # compile
  fields = {**fields, "interleaved": True, "prefill_seconds": seconds[1:],
            "prefill_tokens_per_second": context / min(seconds[1:])}
  return _PrefilledRow(model, state, statics, kv_bits, fields)


def time_prefilled(row: _PrefilledRow, repeats: int) -> dict:
  """The row's run: its best of `repeats` decodes from the kept prefilled state."""
  times, tokens = [], None
  for _ in range(repeats):
    seconds, tokens = _time_decode(row.model, row.state, row.statics)
    times.append(seconds)
  new_tokens, context = row.statics["max_new_tokens"], row.fields["context"]
  rate = (new_tokens - 1) / min(times)  # the first generated token comes from the prefill
  return {**row.fields, "decode_tokens_per_second": rate, "decode_seconds": times, "tokens": tokens,
          "bandwidth_GBps": _bytes_per_step(row.model, context, new_tokens, row.kv_bits) * rate / 1e9}


def _policy_state(model, policy, context: int, new_tokens: int, capacity: int):
  """The decode state after the prefill (and hand-off) of `policy` with a decode cache of `capacity` slots, and
  the statics of its decode loop (prefill + decode as `lacax.generate` runs them, the capacity explicit)."""
  from lacax.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top

  tokens, lengths = generation.pad_prompts([_prompt(context, model.cfg.vocab_size)], bucket=128)
  statics = dict(cfg=model.cfg, policy=policy, sampling=SamplingConfig(), max_new_tokens=new_tokens, stop_ids=())
  state = generation.prefill(model.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                             decode_capacity=capacity, **statics)
  return jax.block_until_ready(state), statics


def _time_decode(model, state, statics) -> tuple[float, list[int]]:

  state = jax.tree.map(jnp.copy, state)  # decode donates its state; keep the prefilled one for the next repeat
  jax.block_until_ready(state)
  memory.back_with_huge_pages(state.cache, min_bytes=memory.HUGE_PAGE_BYTES)  # as lacax.generate does
  start = time.perf_counter()
  state = generation.decode(model.params, state, **statics)
  out = np.asarray(jax.device_get(state.out))
  return time.perf_counter() - start, out[0].tolist()


def policy_runs(model, names: list[str], budget: int, contexts: list[int], new_tokens: int, repeats: int
                ) -> list[dict]:
  """The `--policies` comparison (see the module docstring): one row per (policy, variant, context).

  Every variant is prefilled and compiled first; then the timed decodes go round-robin over the variants,
  `repeats` rounds, so that a busy machine's load drifts over all of them alike; the best round is reported.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lacax.cache import registry  # pylint: disable=g-import-not-at-top

  runs = []
  for context in contexts:
    rows = []
    for name in names:
      policy = registry.make_policy(name, {"size": budget})
      variants = [("after", policy, policy.run_capacity(model.cfg, context, new_tokens))]
      if "lean_decode" in {f.name for f in dataclasses.fields(policy)}:
        variants.append(("before", dataclasses.replace(policy, lean_decode=False),
                         policy.decode_capacity(model.cfg, context + new_tokens)))
      for variant, p, capacity in variants:
        state, statics = _policy_state(model, p, context, new_tokens, capacity)
        _time_decode(model, state, statics)  # compile
        rows.append(dict(policy=name, variant=variant, capacity=capacity, state=state, statics=statics, times=[]))
    for _ in range(repeats):
      for row in rows:
        seconds, tokens = _time_decode(model, row["state"], row["statics"])
        row["times"].append(seconds)
        row["tokens"] = tokens
    for row in rows:
      run = {"impl": "lacax", "policy": row["policy"], "variant": row["variant"], "budget": budget,
             "context": context, "decode_slots": row["capacity"],
             "decode_tokens_per_second": (new_tokens - 1) / min(row["times"]),
             "decode_seconds": row["times"], "tokens": row["tokens"]}
      runs.append(run)
      print(f"{run['policy']}/{run['variant']} ctx={context} slots={run['decode_slots']}: decode "
            f"{run['decode_tokens_per_second']:.2f} tok/s", flush=True)
  for run in runs:
    ref = [r for r in runs if r["policy"] == "streaming" and r["context"] == run["context"]]
    run["vs_streaming"] = run["decode_tokens_per_second"] / ref[0]["decode_tokens_per_second"] if ref else None
  return runs


def _torch_model(path: str | None):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from lacax.weights.loader import default_model_path  # pylint: disable=g-import-not-at-top

  path = path or default_model_path()
  if os.path.isdir(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
  return model.eval()


def bench_torch(model, context: int, new_tokens: int, repeats: int, vocab: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  prompt = torch.tensor([_prompt(context, vocab)])
  best_decode, prefill_seconds, tokens = None, [], None
  with torch.inference_mode():
    for _ in range(repeats + 1):  # the first run warms up
      start = time.perf_counter()
      out = model(prompt, use_cache=True)
      mid = time.perf_counter()
      past, token, generated = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
      for _ in range(new_tokens - 1):
        generated.append(int(token))
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      generated.append(int(token))
      end = time.perf_counter()
      decode_s, prefill_s = end - mid, mid - start
      if best_decode is None or decode_s < best_decode:
        best_decode, tokens = decode_s, generated
      prefill_seconds.append(prefill_s)
  prefill_seconds = prefill_seconds[1:]  # the warm-up run is not timed
  # The first generated token comes from the prefill, as in lacax's accounting.
  return {"decode_tokens_per_second": (new_tokens - 1) / best_decode,
          "prefill_tokens_per_second": context / min(prefill_seconds), "prefill_seconds": prefill_seconds,
          "tokens": tokens}


def _torch_runs(contexts: list[int]) -> list[dict]:
  """The best transformers measurement per context over `--torch_threads`, each taken in a fresh process.

  XLA's and PyTorch's CPU thread pools in one process slow each other down (torch's workers spin), and on a
  busy 2-core machine torch with one thread can beat its default by several times: the baseline is the
  fastest configuration, measured alone.
  """
  best: dict[int, dict] = {}
  for threads in (int(t) for t in _TORCH_THREADS.value):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "torch.json")
      cmd = [sys.executable, "-m", "experiments.bench_decode", f"--torch_only_json={path}",
             f"--contexts={','.join(map(str, contexts))}", f"--new_tokens={_NEW_TOKENS.value}",
             f"--repeats={_REPEATS.value}", f"--model={_MODEL.value}", f"--torch_threads={threads}"]
      subprocess.run(cmd, check=True)
      with open(path) as f:
        for run in json.load(f):
          c = run["context"]
          if c not in best or run["decode_tokens_per_second"] > best[c]["decode_tokens_per_second"]:
            best[c] = run
  return [best[c] for c in contexts]


def _llama_cpp_runs(contexts: list[int], vocab: int, kv_bytes_per_token: float) -> list[dict]:
  """llama.cpp's runs on the same GGUF and prompts, in `--llama_cpp_python` (its own environment: llama.cpp
  is not a lacax dependency). The model must be a GGUF file."""
  path = _MODEL.value or default_model_path()
  if not path.endswith(".gguf"):
    raise ValueError(f"--llama_cpp_python needs a GGUF model; --model={path!r} is not a .gguf file")
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_worker.py")
  with tempfile.TemporaryDirectory() as tmp:
    request, out = os.path.join(tmp, "request.json"), os.path.join(tmp, "runs.json")
    results_lib.write_json(request, {"model": path, "prompts": {str(c): _prompt(c, vocab) for c in contexts},
                                     "new_tokens": _NEW_TOKENS.value, "repeats": _REPEATS.value,
                                     "threads": os.cpu_count(), "flash_attn": [False, True],
                                     "types": [t for t in _LLAMA_CPP_TYPES.value if t]})
    subprocess.run([_LLAMA_CPP_PYTHON.value, worker, request, out], check=True)
    with open(out) as f:
      runs = json.load(f)
  for run in runs:  # llama.cpp's cache is float16
    kv = kv_bytes_per_token * (run["context"] + _NEW_TOKENS.value / 2)
    run["bandwidth_GBps"] = (run["model_bytes"] + kv) * run["decode_tokens_per_second"] / 1e9
  return runs


def main(argv):
  del argv
  contexts = [int(c) for c in _CONTEXTS.value]
  if _TORCH_ONLY_JSON.value:
    import torch  # pylint: disable=g-import-not-at-top

    threads = int(_TORCH_THREADS.value[0])
    if threads:
      torch.set_num_threads(threads)
    torch_model = _torch_model(_MODEL.value or None)
    runs = [{"impl": "transformers", "dtype": "float32", "context": c, "torch_threads": torch.get_num_threads(),
             **bench_torch(torch_model, c, _NEW_TOKENS.value, _REPEATS.value, torch_model.config.vocab_size)}
            for c in contexts]
    results_lib.write_json(_TORCH_ONLY_JSON.value, runs)
    return
  rows, record = [], {"provenance": results_lib.provenance(), "cpu_model": results_lib.cpu_model(),
                      "load_average_start": os.getloadavg(), "new_tokens": _NEW_TOKENS.value, "runs": []}
  if _CEILING.value and not _POLICIES.value:
    record["read_ceiling"] = read_ceiling()
    print(f"read ceiling: {record['read_ceiling']['GBps']:.1f} GB/s ({record['read_ceiling']['how']})", flush=True)
  if _POLICIES.value:
    model = load_model(_MODEL.value or None, dtype=_DTYPES.value[0])
    record.update(model=model.cfg.name, dtype=_DTYPES.value[0], budget=_BUDGET.value)
    record["runs"] = policy_runs(model, _POLICIES.value, _BUDGET.value, contexts, _NEW_TOKENS.value,
                                 _REPEATS.value)
    print(f"\n{'policy':<22}{'context':>8}{'slots':>7}{'decode tok/s':>14}{'vs streaming':>14}")
    for r in record["runs"]:
      vs = float("nan") if r["vs_streaming"] is None else r["vs_streaming"]
      print(f"{r['policy'] + '/' + r['variant']:<22}{r['context']:>8}{r['decode_slots']:>7}"
            f"{r['decode_tokens_per_second']:>14.2f}{vs:>14.2f}")
    record["load_average_end"] = os.getloadavg()
    path = results_lib.timestamped_path(_OUT.value)
    results_lib.write_json(path, record)
    print(f"\nwritten: {path}")
    return
  # Every lacax row, then every llama.cpp row, --rounds times over: each row keeps its best round.
  kv_bit_widths = []
  for bits in _KV_BITS.value:
    if bits not in ("8", "16"):
      raise ValueError(f"--kv_bits: got {bits!r}, expected 16 (the model's dtype) or 8 (int8 KV)")
    kv_bit_widths.append(8 if bits == "8" else None)
  dense_models, models, huge_pages = {}, {}, {}
  measured: dict[tuple, dict] = {}  # row key -> {"label", "dtype", "context", "run" (the best round), "rates"}

  def keep(key, label, dtype, context, run):
    rate = run["decode_tokens_per_second"]
    if key not in measured:
      measured[key] = {"label": label, "dtype": dtype, "context": context, "run": run, "rates": []}
    entry = measured[key]
    entry["rates"].append(rate)
    if rate > entry["run"]["decode_tokens_per_second"]:
      entry["run"] = run

  def model_for(dtype, weights):
    if dtype not in dense_models:
      dense_models[dtype] = load_model(_MODEL.value or None, dtype=dtype)
    record["model"] = dense_models[dtype].cfg.name
    if (dtype, weights) not in models:
      models[dtype, weights] = with_weights(dense_models[dtype], weights, dtype)
      # load_model backed the dense weights with huge pages; packed ones are new arrays. Each row records
      # the bytes this call collapsed (0 where the host does not allow it, with LACAX_HUGEPAGES=0, or where
      # the pages already were huge: numpy madvises its own large allocations, and float32 weights are
      # numpy's buffers) and the process's AnonHugePages after it.
      huge_pages[dtype, weights] = {
          "huge_page_bytes": memory.back_with_huge_pages(models[dtype, weights].params),
          "process_anon_huge_page_bytes": memory.anon_huge_page_bytes()}
    return models[dtype, weights]

  def run_fields(dtype, weights, rope_mode, kv_bits, context, used=True, quant_used=True):
    return {"impl": "lacax", "dtype": dtype, "weights": weights, "rope_mode": rope_mode,
            "cpu_kernel": used, "quant_kernel": quant_used, "context": context,
            "pack_head": weights not in _PACKED or _PACK_HEAD.value,
            **({"sparsity": _SPARSITY.value} if weights == "sparse" else {}),
            **({"kv_bits": 8} if kv_bits == 8 else {}), **huge_pages[dtype, weights]}

  def llama_cpp_round():
    if _LLAMA_CPP_PYTHON.value:
      cfg = dense_models[_DTYPES.value[0]].cfg
      kv16 = cfg.kv_bytes_per_token() * 2 / np.dtype(cfg.jnp_dtype).itemsize
      for run in _llama_cpp_runs(contexts, cfg.vocab_size, kv16):
        label = f"llama.cpp/fa={'on' if run['flash_attn'] else 'off'}"
        keep(("llama.cpp", label, run["type"], run["context"]), label, run["type"], run["context"], run)

  prefilled = []
  if _INTERLEAVE.value:
    if _CPU_KERNEL.value != ["on"] or _QUANT_KERNEL.value != ["on"]:
      raise ValueError(f"--interleave needs --cpu_kernel=on and --quant_kernel=on; got --cpu_kernel="
                       f"{','.join(_CPU_KERNEL.value)} --quant_kernel={','.join(_QUANT_KERNEL.value)}")
    for dtype, weights, rope_mode, kv_bits, context in itertools.product(
        _DTYPES.value, _WEIGHTS.value, _ROPE_MODES.value, kv_bit_widths, contexts):
      model = model_for(dtype, weights)
      fields = run_fields(dtype, weights, rope_mode, kv_bits, context, cpu_attention.available(),
                          cpu_quant_matmul.available())
      prefilled.append(prefilled_row(model, context, _NEW_TOKENS.value, _REPEATS.value, rope_mode, kv_bits, fields))
      print(f"prefilled {decode_targets.lacax_label(fields)} {dtype} ctx={context}", flush=True)

  for round_index in range(_ROUNDS.value):
    if _ROUNDS.value > 1:
      print(f"round {round_index + 1} of {_ROUNDS.value}", flush=True)
    for row in prefilled:
      run = time_prefilled(row, _REPEATS.value)
      label, dtype, context = decode_targets.lacax_label(run), run["dtype"], run["context"]
      keep(("lacax", label, dtype, context), label, dtype, context, run)
      print(f"{label} {dtype} ctx={context}: decode {run['decode_tokens_per_second']:.2f} tok/s", flush=True)
    for dtype in [] if _INTERLEAVE.value else _DTYPES.value:
      for weights in _WEIGHTS.value:
        model = model_for(dtype, weights)
        for kernel in _CPU_KERNEL.value:
          if kernel not in ("on", "off"):
            raise ValueError(f"--cpu_kernel: got {kernel!r}, expected 'on' or 'off'")
          for quant_kernel in _QUANT_KERNEL.value:
            if quant_kernel not in ("on", "off"):
              raise ValueError(f"--quant_kernel: got {quant_kernel!r}, expected 'on' or 'off'")
            cpu_attention.set_enabled(kernel == "on")
            cpu_quant_matmul.set_enabled(quant_kernel == "on")
            jax.clear_caches()  # the choice is made at trace time
            used = kernel == "on" and cpu_attention.available()
            quant_used = quant_kernel == "on" and cpu_quant_matmul.available()
            for rope_mode, kv_bits, context in itertools.product(_ROPE_MODES.value, kv_bit_widths, contexts):
              got = bench_lacax(model, context, _NEW_TOKENS.value, _REPEATS.value, rope_mode, kv_bits)
              run = {**run_fields(dtype, weights, rope_mode, kv_bits, context, used, quant_used), **got}
              label = decode_targets.lacax_label(run)
              keep(("lacax", label, dtype, context), label, dtype, context, run)
              print(f"{label} {dtype} ctx={context}: decode {got['decode_tokens_per_second']:.2f} tok/s",
                    flush=True)
      cpu_attention.set_enabled(True)
      cpu_quant_matmul.set_enabled(True)
    llama_cpp_round()
  for entry in measured.values():
    entry["run"]["round_rates"] = entry["rates"]  # every round's tokens/s, in round order
    record["runs"].append(entry["run"])
    rows.append((entry["label"], entry["dtype"], entry["context"], entry["run"]))
  if _TORCH.value:
    for run in _torch_runs(contexts):
      record["runs"].append(run)
      rows.append(("transformers", "float32", run["context"], run))
      print(f"transformers ctx={run['context']}: decode {run['decode_tokens_per_second']:.2f} tok/s", flush=True)
  torch_speed = {r["context"]: r["decode_tokens_per_second"] for r in record["runs"] if r["impl"] == "transformers"}
  print(f"\n{'impl':<40}{'dtype':<10}{'context':>8}{'decode tok/s':>14}{'prefill tok/s':>15}{'vs torch':>10}"
        f"{'GB/s':>8}{'/ceil':>7}")
  ceiling = record.get("read_ceiling", {}).get("GBps", float("nan"))
  for impl, dtype, context, got in rows:
    ratio = got["decode_tokens_per_second"] / torch_speed[context] if context in torch_speed else float("nan")
    got["of_read_ceiling"] = got.get("bandwidth_GBps", float("nan")) / ceiling
    got["ratio_vs_transformers"] = ratio
    bw = got.get("bandwidth_GBps", float("nan"))
    print(f"{impl:<40}{dtype:<10}{context:>8}{got['decode_tokens_per_second']:>14.2f}"
          f"{got['prefill_tokens_per_second']:>15.1f}{ratio:>10.2f}{bw:>8.2f}{got['of_read_ceiling']:>7.2f}")
  for run in record["runs"]:
    if run["impl"] == "lacax" and run["context"] in torch_speed:
      run["ratio_vs_transformers"] = run["decode_tokens_per_second"] / torch_speed[run["context"]]
  record["targets"] = decode_targets.judge(record["runs"])
  if record["targets"]:
    print("\n" + decode_targets.table(record["targets"]))
  record["load_average_end"] = os.getloadavg()  # a shared machine makes every ratio noisy: say how busy it was
  path = results_lib.timestamped_path(_OUT.value)
  results_lib.write_json(path, record)
  print(f"\nwritten: {path}")


if __name__ == "__main__":
  app.run(main)
