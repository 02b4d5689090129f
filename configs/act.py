"""ACT (attention calibration): select heads on calibration splits, compare accuracy with and without ACT.

  python -m experiments.run --config=configs/act.py          # all offline tasks, full sweep (GPU/TPU-sized)
  python -m experiments.run --config=configs/act.py:cpu      # a few minutes on 2 CPU cores
  python -m experiments.run --config=configs/act.py --config.act.heads_path=results/act/<run>/heads_independent.json
  python -m experiments.run --config=configs/act.py --config.tasks.names=sst2,AGNews,ARCE \\
      --config.tasks.data_dir=/data/act_jsonl --config.tasks.num_calibration=900

Defaults follow the reference (GATECH-EIC/ACT scripts): beta 0.4, absolute threshold 0.1, layers 2..L-2,
independent selection (every head that alone raises calibration accuracy). The paper's threshold is
`--config.act.threshold_mode=alpha_over_n --config.act.alpha=5`.
"""

import ml_collections

OFFLINE = "sentiment,topic,question_type,animal_class,capitals,larger,arithmetic"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "act"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  # Calibration settings; heads_path = a heads_<mode>.json from an earlier run (skips the search).
  c.act = ml_collections.ConfigDict(dict(beta=0.4, threshold_mode="absolute", threshold=0.1, alpha=5.0,
                                         first_row="consistent", heads_path=""))
  # Offline task names and/or reference data set names (the latter read from data_dir/<name>/*.jsonl).
  # mc_scoring: "" = per source (offline "options", reference "generate"), or "letters" / "options" / "generate".
  c.tasks = ml_collections.ConfigDict(dict(names=OFFLINE, data_dir="", num_calibration=64, num_evaluation=300,
                                           seed=0, mc_scoring="", strip_trailing_space=False))
  # mode: "independent" (reference), "greedy", or "both" (one sweep, both selections evaluated).
  # layers / heads: "" = reference (layers 2..L-2, all heads), "a:b" or "i,j,k". min_gain in examples.
  # prune: skip heads without any hidden sink on the calibration data (exact). max_candidates: 0 = no cap,
  # else only the heads on which ACT moves the most attention mass are swept (an approximation).
  c.search = ml_collections.ConfigDict(dict(mode="independent", layers="", heads="", min_gain=1, prune=True,
                                            max_candidates=0))
  c.batch_size = 32
  c.bucket = 16
  c.plot = ml_collections.ConfigDict(dict(enabled=True, task="", example=0))
  if arg == "cpu":
    c.tasks.names = "sentiment,topic,larger"
    c.tasks.num_calibration = 24
    c.tasks.num_evaluation = 64
    c.search.max_candidates = 6
  elif arg not in (None, ""):
    raise ValueError(f"configs/act.py variant {arg!r} is unknown; expected '' or 'cpu'")
  return c
