"""KVMerger vs H2O vs the full cache, one-shot (prefill, compress once, decode): passkey retrieval or LongBench.

  python -m experiments.run --config=configs/kvmerger.py:cpu               # SmolLM2-135M passkey grid, CPU
  python -m experiments.run --config=configs/kvmerger.py --config.model.path=/models/Llama-2-7b-chat-hf
  python -m experiments.run --config=configs/kvmerger.py:longbench --config.data.path=/data/longbench/data

Why one-shot tasks: KVMerger merges the *prefill* cache once (the paper's phase; `KVMergerPolicy` returns the
cache unchanged at decode steps), so in token-by-token streaming perplexity there is no prefill and it would
never act. Its paper evaluates a long prompt followed by a short answer: LongBench, ZeroScrolls and NIAH. The
default here is the offline passkey grid (`lacax/jobs/passkey.py`, the LaCache reference's prompt), and the
"longbench" variant is the paper's 9 English LongBench tasks (needs the data, see configs/longbench.py).

Every policy keeps the same budget C = int(budget * prompt tokens) (LongBench: budget * max_length):
  kvmerger  merges adjacent similar keys (Gaussian-kernel weights around the most-attended pivot) down to exactly
            C slots per (layer, KV head) (`exact_budget=True`; the paper tunes a threshold eps = 0.75 and
            protected fractions to land near the budget, which --config.cache.exact_budget=False reproduces,
            leaving C as an upper bound). The first two and the last layer are never merged (unverified
            summary of the paper), so they keep the whole prompt.
  h2o       C/2 heavy hitters by accumulated attention + C/2 recent tokens, evicting at every decode step.
  full      no eviction.

Paper settings (KVMerger, arXiv 2407.08454, second-hand): Llama2-7B-chat (4k context), cache budgets 50% and
35%, LongBench (9 tasks: gov_report, multi_news, narrativeqa, qasper, multifieldqa_en, trec, 2wikimqa,
triviaqa, passage_retrieval_en) and NIAH heatmaps up to 4k. Variants:
  ""           passkey grid 1k/2k/3k/4k tokens x 11 depths x 10 samples, budget 0.5;
  "budget35"   the same at budget 0.35;
  "longbench"  the 9 LongBench tasks, max_length 3500 (Llama2-7B-chat's model2maxlen), budget 0.5;
  "cpu"        SmolLM2-135M (embedded), passkey at 512 / 1024 tokens x 5 depths x 2 samples.
Results go to results/kvmerger/<job>/<timestamp>/.
"""

import ml_collections

from configs import longbench
from configs import passkey

KVMERGER_LONGBENCH_TASKS = ("gov_report", "multi_news", "narrativeqa", "qasper", "multifieldqa_en", "trec",
                            "2wikimqa", "triviaqa", "passage_retrieval_en")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg == "longbench":
    c = longbench.get_config()
    c.tasks = KVMERGER_LONGBENCH_TASKS
  elif arg in (None, "", "budget35", "cpu"):
    c = passkey.get_config("cpu" if arg == "cpu" else None)
    if arg != "cpu":
      c.grid.lengths = (1024, 2048, 3072, 4096)
      c.grid.samples_per_cell = 10
      c.batch_size = 2
    if arg == "budget35":
      c.cache.budget = 0.35
  else:
    raise ValueError(f"configs/kvmerger.py variant {arg!r} is unknown; expected '', 'budget35', 'longbench' or "
                     "'cpu'")
  c.results_dir = "results/kvmerger"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.policies = ("full", "h2o", "kvmerger")
  return c
