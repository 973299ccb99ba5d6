"""Hyper-parameter search with Hydra's Optuna sweeper (configs/hydra/sweeper/search.yaml).

A job returns its ``RunResult`` (train/result.py): Hydra's launchers and
callbacks read its status (callbacks.Reporter), an optimising sweeper calls
``float()`` on it, which is :func:`objective`: the run's final validation
error. The search selects on held-out training images, never on the test set:
``callbacks.RefuseTestSearch`` stops a search run with ``data.val_size=0``.
"""

from __future__ import annotations

import logging

from resnet_exp.train.result import OBJECTIVE, objective

# optuna imports alembic, which logs each of its plugins at INFO when Hydra loads the sweeper.
logging.getLogger("alembic").setLevel(logging.WARNING)

__all__ = ["OBJECTIVE", "objective"]
