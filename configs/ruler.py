"""RULER (13 synthetic long-context tasks, official scoring): full cache vs StreamingLLM vs LaCache.

  python -m experiments.run --config=configs/ruler.py:cpu          # SmolLM2-135M, 1k tokens, 2 samples per task
  python -m experiments.run --config=configs/ruler.py --config.model.path=/models/Llama-3.1-8B-Instruct
  python -m experiments.run --config=configs/ruler.py:cpu --config.lengths="(4096,)" \
      --config.policies="('full','snapkv','tova')" --config.cache.budget=0.25

The tasks of NVIDIA/RULER's default suite (`lacax.eval.ruler`): niah_single_1/2/3, niah_multikey_1/2/3,
niah_multivalue, niah_multiquery, vt, cwe, fwe, qa_1, qa_2, generated offline and deterministically from
`seed` (RULER's 42) with lacax's word lists (`wordfreq`) and prose (`haystack.path`; "" = the English prose
shipped with Python). Each prompt plus the task's decode length fits in `lengths` tokens of the model. The cache
protocol is the one-shot one of the passkey / NIAH job (`lacax/jobs/ruler.py`): full prefill, one compaction to
C = int(cache.budget * prompt tokens), greedy decode compacting after every token; RULER's string_match_all /
string_match_part scores.

`chat=True` (RULER's model templates for instruct models): the tokenizer's chat template around the input, the
answer prefix after it; --config.chat=False is RULER's "base" template.

Variants:
  ""     RULER's standard sweep: 4k, 8k, 16k, 32k, 64k, 128k tokens, 500 samples per task and length, budget 0.5;
         the embedded SmolLM2 has an 8k context: use --config.model.path for a long-context model.
  "cpu"  SmolLM2-135M (embedded), 1k tokens, 2 samples per task, batch 2 (12 tasks: niah_multiquery's shortest
         prompt does not fit in 1k tokens).
  "4k"   one length, 4096 tokens, 10 samples per task (the length kvpress's leaderboard averages).
"""

import ml_collections

from lacax.cache import registry
from lacax.eval import ruler


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "ruler"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  c.haystack = ml_collections.ConfigDict(dict(path="", field="text", encoding="utf-8"))
  c.tasks = tuple(ruler.TASKS)
  c.lengths = (4096, 8192, 16384, 32768, 65536, 131072)
  c.num_samples = 500
  c.seed = 42
  c.chat = True
  c.batch_size = 1
  c.policies = ("full", "streaming", "lacache")
  # budget: fraction of the prompt every compacting policy keeps; the other fields as in configs/lacache.py.
  c.cache = ml_collections.ConfigDict(dict(budget=0.5, **registry.cache_defaults()))
  if arg == "cpu":
    c.lengths = (1024,)
    c.num_samples = 2
    c.batch_size = 2
    # niah_multiquery's prompt with its smallest haystack is 904 tokens + 128 generated on SmolLM2: over 1k.
    c.tasks = tuple(t for t in ruler.TASKS if t != "niah_multiquery")
  elif arg == "4k":
    c.lengths = (4096,)
    c.num_samples = 10
  elif arg not in (None, ""):
    raise ValueError(f"configs/ruler.py variant {arg!r} is unknown; expected '', 'cpu' or '4k'")
  return c
