"""LongBench v1 / LongBench-E: official prompts, truncation and metrics; full cache vs StreamingLLM vs LaCache.

  python -m experiments.run --config=configs/longbench.py --config.data.path=/data/longbench/data \
      --config.model.path=/models/Llama-2-7b-chat-hf
  python -m experiments.run --config=configs/longbench.py:cpu --config.data.path=/data/longbench/data

LongBench data is not bundled and cannot be fetched offline: download
https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip and point `data.path` at the unzipped
folder of `<task>.jsonl` (or `<task>_e.jsonl` with data.longbench_e=True) files, or at one such file.

The pipeline is the official `pred.py` as LaCache runs it (`lacax/jobs/longbench.py`): template, middle
truncation to `max_length` tokens, chat template except for trec / triviaqa / samsum / lsht / lcc / repobench-p,
full prefill, one compaction to C = int(budget * max_length), greedy decode of the task's official maximum,
compacting after every token; official metrics, unweighted average over tasks.

Chat template: `chat=True` applies the tokenizer's own template. The official `build_chat` wraps only model
families it knows ("[INST]...[/INST]" for llama2, vicuna, chatglm, ...) and leaves the prompt raw for any other
model (e.g. SmolLM2, Llama-3): pass --config.chat=False to reproduce such runs.

Variants:
  ""          the LaCache paper's main LongBench setting: Llama-2-7b-chat (max_length 3500, model2maxlen),
              budget 0.5, span 16, overlap 0, all 21 tasks present in data.path;
  "budget25"  the paper's 25% setting for Llama-2-7b-chat: budget 0.25, span 9, overlap 3;
  "smollm2"   the reference scripts' SmolLM2-1.7B-Instruct setting: max_length 7500, budget 0.5, span 9, overlap 7;
  "cpu"       the embedded SmolLM2-135M, max_length 1024, 2 examples per task of 4 short-answer English tasks
              (a few minutes on 2 CPU cores once data.path is set).
"""

import ml_collections

from lacax.cache import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "longbench"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  # path: a folder of <task>.jsonl files (or one file); longbench_e: read <task>_e.jsonl, score by length bucket.
  c.data = ml_collections.ConfigDict(dict(path="", longbench_e=False))
  c.tasks = ()  # () = every task whose file is in data.path
  c.max_examples = 0  # per task; 0 = all
  c.max_length = 3500
  c.chat = True
  c.batch_size = 1
  c.policies = ("full", "streaming", "lacache")
  # budget: fraction of max_length every compacting policy keeps; the other fields as in configs/lacache.py.
  c.cache = ml_collections.ConfigDict(dict(budget=0.5, **registry.cache_defaults()))
  if arg == "budget25":
    c.cache.budget, c.cache.span, c.cache.overlap = 0.25, 9, 3
  elif arg == "smollm2":
    c.max_length = 7500
    c.cache.span, c.cache.overlap = 9, 7
  elif arg == "cpu":
    c.max_length = 1024
    c.max_examples = 2
    c.tasks = ("hotpotqa", "trec", "passage_retrieval_en", "passage_count")
    c.batch_size = 2
  elif arg not in (None, ""):
    raise ValueError(f"configs/longbench.py variant {arg!r} is unknown; expected '', 'budget25', 'smollm2' or 'cpu'")
  return c
