"""How a run ended and what it measured: one ``RunResult``, read by everyone.

The trainer, ``mode=eval`` and ``mode=diagnose`` return a ``RunResult``; the
CLI turns it into the command's exit status in one place (``cli.leave``);
the packed launcher, the sweep's callbacks and the search read the same
object (a search minimises ``float(result)``, see search.py). Its ``summary``
is what summary.json holds, and the status in it is written here alone.

Exit status of a run (``RunResult.exit_code``):

=======================  ========================================================
status                   exit status
=======================  ========================================================
completed                0
pruned                   0 (a search's pruner stopped the trial; its checkpoint is kept)
failed                   2 (a bad input; an internal error is a traceback: 1)
diverged                 3
interrupted, time limit  75 (sysexits' EX_TEMPFAIL: resumable, run it again)
not started, time limit  75 (too little of the limit was left to start)
stopped by signal N      128 + N, whatever the status (the shell's convention)
=======================  ========================================================

A status that a later ending needs goes into ``Status`` and ``EXIT_CODES``;
why a run ended early goes into ``reason``: a signal's name, or ``time_limit``
(``trainer.time_limit``; no signal). A run stopped at its time limit is
resumable, not failed: a sweep of such runs ends with 75 too, and the same
command with ``resume=auto`` continues it.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from resnet_exp.errors import UserError
from resnet_exp.run.stop import TIME_LIMIT, Interrupted, exit_code


class Status(str, Enum):
    """How a run ended: summary.json's ``status``."""

    completed = "completed"
    interrupted = "interrupted"  # stopped on request after a checkpoint; resumable
    diverged = "diverged"  # the loss became NaN/inf; the last good checkpoint is kept
    pruned = "pruned"  # a search's trial stopped behind the others; checkpoint kept, exit 0
    failed = "failed"  # a bad input or an internal error (a sweep job's summary)
    unfinished = "unfinished"  # no summary: killed, or still running
    not_started = "not_started"  # a sweep's job left for later: its time limit was (nearly) up

    @classmethod
    def of(cls, summary: dict[str, Any]) -> Status:
        return cls(summary.get(SummaryKey.status, cls.unfinished))


# The command's exit status for each ending (a stop by signal N: 128 + N, see RunResult).
EXIT_CODES: dict[Status, int] = {
    Status.completed: 0,
    Status.pruned: 0,
    Status.failed: 2,
    Status.diverged: 3,
    Status.interrupted: 75,  # at its time limit (a signal's stop: 128 + N)
    Status.not_started: 75,
}
# The statuses with which a run did what it was asked: a sweep counts the others as failed,
# but for those left to continue (RunResult.resumable).
OK = (Status.completed, Status.pruned)


class SummaryKey:
    """summary.json's keys beyond the run's description (block, depth, params, ...).

    The split evaluated during training is ``test``, or ``val`` with data.val_size > 0.
    """

    status = "status"
    error = "error"  # a failed job's one-line message
    signal = "signal"  # interrupted: the signal's name
    reason = "reason"  # interrupted: the signal's name, or time_limit
    checkpoint = "checkpoint"  # interrupted or pruned: the last.pt to resume from
    diverged_at_step = "diverged_at_step"
    pruned_at_epoch = "pruned_at_epoch"  # pruned: the last epoch it trained and evaluated
    steps_done = "steps_done"  # of ``steps``, the run's length (the run's description)
    steps = "steps"
    test_loss, test_error = "test_loss", "test_error"  # with a val split: the test set at the end
    final_train_loss, final_train_error = "final_train_loss", "final_train_error"
    train_images_per_s = "train_images_per_s"
    wall_time_s = "wall_time_s"  # every part of a resumed run
    parts = "parts"  # how many times the run was started (1 + its resumes)

    @staticmethod
    def final(split: str, what: str) -> str:
        """The last evaluation on ``split`` (``loss`` or ``error``)."""
        return f"final_{split}_{what}"

    @staticmethod
    def best(split: str) -> str:
        """The lowest scheduled-evaluation error on ``split``."""
        return f"best_{split}_error"


class Diverged(UserError):
    """A Python caller's view of a diverged run (``RunResult.check``)."""


@dataclass
class RunResult:
    """One run's ending (``status``, ``reason``, ``message``) and its ``summary``.

    ``summary`` is summary.json's content: the run's description, what it
    measured, and its ending's keys (the status, set here from ``status``).
    ``reason`` says why it ended early: the name of the signal that asked it to
    stop (``"SIGTERM"``), also for a run that completed while stopping, or
    ``time_limit``.
    ``message`` is one line for the user when it did not complete (summary.json
    keeps a failure's as ``error``; two results are equal by what summary.json keeps).
    """

    status: Status
    summary: dict[str, Any] = field(default_factory=dict)
    message: str | None = field(default=None, compare=False)
    reason: str | None = None

    def __post_init__(self) -> None:
        self.summary = {**self.summary, SummaryKey.status: self.status}
        if self.status in (Status.interrupted, Status.not_started) and self.reason is not None:
            self.summary[SummaryKey.reason] = self.reason
            if self.signum is not None:
                self.summary[SummaryKey.signal] = self.reason
        if self.status is Status.failed and self.message:
            self.summary.setdefault(SummaryKey.error, self.message)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> RunResult:
        """A result as its summary.json keeps it (no summary: ``unfinished``)."""
        return cls(
            Status.of(summary),
            summary,
            message=summary.get(SummaryKey.error),
            reason=summary.get(SummaryKey.reason, summary.get(SummaryKey.signal)),
        )

    @property
    def ok(self) -> bool:
        """The run did what it was asked (a sweep counts the others as failed)."""
        return self.status in OK

    @property
    def resumable(self) -> bool:
        """Left to continue (``resume=auto``): stopped at its time limit, or not started."""
        return self.reason == TIME_LIMIT and self.status in (Status.interrupted, Status.not_started)

    @property
    def signum(self) -> int | None:
        """The signal that asked the run to stop, if one did."""
        if self.reason in signal.Signals.__members__:
            return int(signal.Signals[self.reason])
        return None

    @property
    def stop_requested(self) -> bool:
        """A stop was asked for: the command ends, a whole sweep included, once it saved."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The command's exit status for this result (the module's table)."""
        if self.signum is not None:
            return exit_code(self.signum)
        return EXIT_CODES[self.status]

    def check(self) -> RunResult:
        """This result if the run completed; otherwise what a Python caller expects
        to be raised: Interrupted (a stop or the time limit), Diverged, or UserError."""
        if self.signum is not None or self.status is Status.interrupted:
            checkpoint = self.summary.get(SummaryKey.checkpoint)
            step = int(self.summary.get(SummaryKey.steps_done) or 0)
            path = Path(checkpoint) if checkpoint else None
            raise Interrupted(self.signum, step, path, self.reason)
        if self.status is Status.diverged:
            raise Diverged(self.message or "the loss became non-finite")
        if not self.ok:
            raise UserError(self.message or f"the run ended {self.status.value}")
        return self

    def __float__(self) -> float:
        """The value a search minimises (search.py); Hydra's sweepers call ``float()``."""
        return objective(self)


# The value a search minimises: the final error on the held-out training images.
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
    if result.status is not Status.completed:
        why = f"{result.status.value}: {result.message}"
    elif "val_images" not in result.summary:
        why = "it held out no validation images: data.val_size=0"
    else:
        why = "its summary has no final validation error"
    raise ValueError(f"the job has no {OBJECTIVE} to minimise ({why})")
