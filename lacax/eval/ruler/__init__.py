"""RULER (NVIDIA/RULER, arXiv 2404.06654): synthetic long-context tasks generated offline, with the official
scoring.

  tasks    the 13 tasks of RULER's default suite (NIAH single / multikey / multivalue / multiquery, variable
           tracking, common and frequent words extraction, QA on given passages), generated deterministically
           from lacax's own word lists and text and fitted to a length in the model's tokens (`generate`);
  metrics  string_match_all / string_match_part and RULER's prediction post-processing;
  words    the word lists and the sentence splitter the generators use.

The job that runs the suite under several cache policies is `lacax.jobs.ruler` (`configs/ruler.py`).
"""

from lacax.eval.ruler.metrics import (METRICS, average, postprocess_pred, sample_match, score_task,  # noqa: F401
                                      string_match_all, string_match_part)
from lacax.eval.ruler.tasks import (DEPTHS, NEEDLE, NOISE, TASKS, TEMPLATES, RulerSample, generate,  # noqa: F401
                                    metric_of, sample_rng, tokens_to_generate)
