"""ACT: training-free attention calibration of hidden attention sinks (arXiv 2406.15765).

* `calibration`: the online calibration of post-softmax attention (`calibrate_probs`), its `ACTConfig`, and
  the `probs_hook`s that switch it on per (layer, head) inside `lacax.model.llama.forward`.
* `tasks`: zero-shot classification and multiple-choice tasks (the reference's JSONL formats and offline
  generated ones); their batched, jitted scoring is the generic harness `lacax.eval.zero_shot`.
* `search`: offline head selection (the reference's one-head-at-a-time sweep, and a greedy variant).
"""

from lacax.act.calibration import ACTConfig, calibrate_probs, load_heads, make_probs_hook, \
    make_traced_probs_hook, save_heads

__all__ = ["ACTConfig", "calibrate_probs", "load_heads", "make_probs_hook", "make_traced_probs_hook", "save_heads"]
