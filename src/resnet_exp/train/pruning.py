"""What the trainer tells someone after each scheduled evaluation, and whether it
should stop there: a search's pruner.

The trainer knows only this protocol; cli.py builds the object from the config
(search_study.trial_reporter) and hands it to ``Trainer``, so train/ imports
nothing of the search. In a data-parallel run rank 0 reports and decides; the
other ranks hold ``FollowRankZero`` and take rank 0's word (``distributed.any_rank``).
"""

from __future__ import annotations

from typing import Protocol


class EvaluationReporter(Protocol):
    def should_stop(self, epoch: int, val_error: float) -> bool:
        """Take ``epoch``'s (1-based) validation error; True: the run stops after it."""
        ...


class FollowRankZero:
    """A rank that reports nothing and never stops on its own word."""

    def should_stop(self, epoch: int, val_error: float) -> bool:
        return False
