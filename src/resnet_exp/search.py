"""What a search minimises (configs/hydra/sweeper/search.yaml; the sweeper:
hydra_plugins/resnet_exp_search, the study: search_study.py).

A job returns its summary as a ``JobResult``: a dict to Hydra's launchers and
callbacks (callbacks.Reporter reads its status), a number to an optimising
sweeper, which calls ``float()`` on a job's return value: the run's final
validation error (a pruned trial's value is its last reported one, see
search_run.job_outcome). The search selects on held-out training images, never on
the test set: ``callbacks.RefuseTestSearch`` stops a search run with ``data.val_size=0``.
"""

from __future__ import annotations

import math

from resnet_exp.train.records import Status

OBJECTIVE = "final_val_error"


class JobResult(dict):
    """A job's summary; ``float(result)`` is the value a search minimises.

    A diverged run counts as 100% error (as bad as a net gets), so the sampler
    learns to avoid its region; a job that failed otherwise has no value (Optuna
    records the trial as failed and goes on).
    """

    def __float__(self) -> float:
        value = self.get(OBJECTIVE)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        status = self.get("status", "no status")
        if status == Status.diverged:
            return 100.0
        why = "no validation split: data.val_size=0" if status == Status.completed else status
        raise ValueError(f"the job has no {OBJECTIVE} to minimise ({why}: {self.get('error')})")
