"""Experiment jobs: each is `run(config, run_dir) -> dict of results`, driven by `experiments/run.py`."""
