"""Stopping training cleanly on SIGTERM or SIGINT (Ctrl-C).

The first signal only sets a flag; the training loop reads it once per step
(a Python attribute, no device sync), finishes that step, writes a checkpoint
and returns an ``interrupted`` result (train/result.py); the command exits with
128 + the signal number.
A second signal raises :class:`Abort` at once (checkpoints are written
atomically, so that cannot corrupt ``last.pt``), and a third one gets the
operating system's default action, in case Python code never runs again.

Anything else that learns of an imminent stop (a cluster's preemption notice, a
requeue hook) calls :meth:`StopRequest.request` for the same clean stop.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def requeue_signal() -> int | None:
    """The signal submitit sends before a SLURM time limit or preemption (SIGUSR2
    unless configured otherwise); None outside a submitit job."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    from submitit import JobEnvironment

    return int(JobEnvironment._usr_sig())


def handled_signals() -> tuple[int, ...]:
    sig = requeue_signal()
    return SIGNALS + ((sig,) if sig is not None else ())


def requeue(signum: int) -> None:
    """After the checkpoint: hand a submitit job's signal to submitit's own handler,
    which resubmits the job (it resumes from last.pt with resume=auto) and exits."""
    handler = signal.getsignal(signum)
    if signum == requeue_signal() and callable(handler):
        handler(signum, None)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal."""
    return 128 + signum


class Interrupted(Exception):
    """Training stopped on request after saving a checkpoint: what ``train()`` raises
    for a Python caller (``RunResult.check``)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class Abort(KeyboardInterrupt):
    """A second signal: stop at once, without writing anything more."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """A flag set by the first SIGTERM/SIGINT (or by :meth:`request`)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            # os.write, not print or logging: a handler may run inside their locks.
            os.write(
                2,
                f"\nresnet-exp: {signal_name(signum)} received: stopping after this step and "
                f"saving a checkpoint (send it again to stop at once)\n".encode(),
            )
            return
        for s in handled_signals():
            signal.signal(s, signal.SIG_DFL)
        raise Abort(signum)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Route SIGINT and SIGTERM here for the duration; restore the old handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; rely on request()
            return
        previous: dict[int, Any] = {s: signal.getsignal(s) for s in handled_signals()}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
