"""LongBench v1 / LongBench-E: data loading, prompts and the official metrics, offline.

This module reproduces the scoring of THUDM/LongBench (`LongBench/eval.py`, `metrics.py`, configs) as used
unchanged by GATECH-EIC/LaCache (`LongBench/eval.py`, which only adds an unweighted average over tasks), with
pure-Python re-implementations of the two third-party scorers the official code calls:

* ``rouge==1.0.1`` (``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]``), see `rouge_l_f1`;
* ``fuzzywuzzy==0.18.0`` ``fuzz.ratio`` without python-Levenshtein (LaCache's environment pins fuzzywuzzy and
  does not install python-Levenshtein, so fuzzywuzzy falls back to `difflib`), see `fuzz_ratio`.

Only the Chinese metrics need a third-party package: ``jieba`` (``pip install jieba``), imported lazily.

Pipeline (mirrors the official ``pred.py``; the model side lives elsewhere)::

  examples = load_longbench("/data/longbench", tasks=["qasper"])      # {task: [LongBenchExample]}
  prompt = build_prompt("qasper", ex)                                  # PROMPT_TEMPLATES[task].format(...)
  prompt = truncate_prompt(prompt, max_len, encode, decode)            # middle truncation, text round trip
  if uses_chat_template("qasper"): prompt = <model chat template>(prompt)
  pred = <greedy decode of at most MAX_NEW_TOKENS["qasper"] tokens>
  scores = score_longbench({"qasper": [PredictionRecord(pred, ex.answers, ex.all_classes, ex.length), ...]})

Known, documented differences from the official code are listed in the docstrings of `rouge_l_f1`,
`code_sim_score`, `middle_truncate`, `score_task` and `score_task_e`; none changes a score except in the
failure cases named there.

The package follows the pipeline's own sections: `tasks` (the data tables), `data` (loading), `prompts`
(templates and truncation) and `metrics` (normalisation, metrics, aggregation); every public name is
re-exported here, so `from lacax.eval import longbench as lb; lb.score_longbench(...)` reads as before.
"""

from lacax.eval.longbench.tasks import *  # noqa: F401,F403
from lacax.eval.longbench.data import *  # noqa: F401,F403
from lacax.eval.longbench.prompts import *  # noqa: F401,F403
from lacax.eval.longbench.metrics import *  # noqa: F401,F403
from lacax.eval.longbench.metrics import _lcs_words  # noqa: F401  (tests)
