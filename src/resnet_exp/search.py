"""What a search minimises (configs/hydra/sweeper/search.yaml; the sweeper:
hydra_plugins/resnet_exp_search, the study: search_study.py).

A job returns its ``RunResult`` (train/result.py): Hydra's launchers and
callbacks read its status (callbacks.Reporter), an optimising sweeper calls
``float()`` on it, which is :func:`objective`: the run's final validation
error. A pruned trial is told to the study as pruned (its value is the last
one it reported, see search_run.job_outcome). The search selects on held-out
training images, never on the test set: ``callbacks.RefuseTestSearch`` stops
a search run with ``data.val_size=0``.
"""

from __future__ import annotations

from resnet_exp.train.result import OBJECTIVE, objective

__all__ = ["OBJECTIVE", "objective"]
