"""Hyper-parameter search with Hydra's Optuna sweeper (configs/hydra/sweeper/search.yaml).

A job returns its ``RunResult`` (train/result.py): Hydra's launchers and
callbacks read its status (callbacks.Reporter), an optimising sweeper calls
``float()`` on it, which is :func:`objective`: the run's final validation
error. The search selects on held-out training images, never on the test set:
``callbacks.RefuseTestSearch`` stops a search run with ``data.val_size=0``.
"""

from __future__ import annotations

import logging
import math

from resnet_exp.train.result import RunResult, Status

# optuna imports alembic, which logs each of its plugins at INFO when Hydra loads the sweeper.
logging.getLogger("alembic").setLevel(logging.WARNING)

OBJECTIVE = "final_val_error"


def objective(result: RunResult) -> float:
    """What a search minimises for one job.

    A diverged run counts as 100% error (as bad as a net gets), so the sampler
    learns to avoid its region; a job that failed otherwise has no value (Optuna
    records the trial as failed and goes on).
    """
    value = result.summary.get(OBJECTIVE)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if result.status is Status.diverged:
        return 100.0
    why = (
        "no validation split: data.val_size=0"
        if result.status is Status.completed
        else result.status.value
    )
    raise ValueError(f"the job has no {OBJECTIVE} to minimise ({why}: {result.message})")
