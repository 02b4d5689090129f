"""Needle-in-a-haystack: a needle sentence in real prose, on a (context length x depth) grid, per cache policy.

The same job as `lacax.jobs.passkey` (`config.task = "niah"`), under its own name so that results go to
`results/niah/<timestamp>/`. See `configs/niah.py` for the set-up.
"""

from lacax.jobs.passkey import run, validate, validate_config

__all__ = ["run", "validate", "validate_config"]
