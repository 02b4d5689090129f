"""A leaderboard of cache policies at several budgets on one task (score against budget per policy).

  python -m experiments.run --config=configs/compare_policies.py:ruler,cpu
  python -m experiments.run --config=configs/compare_policies.py:passkey,cpu --config.budgets="(0.5,0.25)"
  python -m experiments.run --config=configs/compare_policies.py:streaming,cpu
  python -m experiments.run --config=configs/compare_policies.py:longbench,cpu --config.job.data.path=/data/lb
  python -m experiments.run --config=configs/compare_policies.py:ruler,4k \
      --config.policies="('full','streaming','snapkv','tova')" --config.job.num_samples=20

The variant is "<task>[,<task variant>]": the task's own config (`configs/<task>.py:<task variant>`; task one of
passkey, niah, ruler, streaming (= configs/lacache.py), longbench) becomes `config.job`, whose fields are
overridden as `--config.job.<field>`. `lacax/jobs/compare_policies.py` runs that job once per (policy, budget)
with the model loaded once, and writes the leaderboard table, `results.json` and `leaderboard.png`.

Budgets are fractions kept: of the prompt (passkey / NIAH / RULER), of max_length (LongBench), of the streamed
tokens (streaming perplexity). The default policies are every registered policy (for streaming perplexity,
every one that compresses while decoding: `lacax.jobs.lacache.streaming_policies`). QFilter and ExpectedAttention
(calibrated statistics, the default) read lacax's calibration of the model: run
`python -m experiments.calibrate_scorers` once and pass the two `--config.job.cache.*` overrides it prints
(validation refuses the run without them, naming the two policies).
"""

import importlib

import ml_collections

from lacax.cache import registry
from lacax.jobs import lacache

_TASK_CONFIGS = {"passkey": "passkey", "niah": "niah", "ruler": "ruler", "streaming": "lacache",
                 "longbench": "longbench"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  task, _, variant = (arg or "ruler,cpu").partition(",")
  if task not in _TASK_CONFIGS:
    raise ValueError(f"configs/compare_policies.py variant {arg!r}: the task {task!r} is unknown; expected one of "
                     f"{list(_TASK_CONFIGS)}, optionally followed by ',<variant of its config>' (e.g. 'ruler,cpu')")
  c = ml_collections.ConfigDict()
  c.experiment = "compare_policies"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.model = ml_collections.ConfigDict(dict(path="", dtype="float32"))
  c.task = task
  c.budgets = (0.5, 0.25)
  c.job = importlib.import_module(f"configs.{_TASK_CONFIGS[task]}").get_config(variant or None)
  # Every registered policy; for streaming perplexity those that compress while decoding (at the config's cache
  # fields: the prefill-only ones would report the full cache's figure, and the job refuses them).
  c.policies = lacache.streaming_policies(c.job.cache) if task == "streaming" else registry.policy_names()
  if task == "streaming":  # Decoding / CaM compress within the stream (kvpress's 512 steps outlast the :cpu one)
    c.job.cache.compression_interval = 64
  return c
