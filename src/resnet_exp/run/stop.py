"""Stopping training cleanly on SIGTERM or SIGINT (Ctrl-C).

The first signal only sets a flag; the training loop reads it once per step
(a Python attribute, no device sync), finishes that step, writes a checkpoint
and returns an ``interrupted`` result (run/result.py); the command exits with
128 + the signal number.
A second signal raises :class:`Abort` at once (checkpoints are written
atomically, so that cannot corrupt ``last.pt``), and a third one gets the
operating system's default action, in case Python code never runs again.

Anything else that learns of an imminent stop (a cluster's preemption notice, a
requeue hook) calls :meth:`StopRequest.request` for the same clean stop.

A time limit (``trainer.time_limit``, :class:`TimeLimit`) takes the same path:
the loop asks it once per step whether the time left still covers what a stop
costs (the checkpoint and an evaluation, as measured so far) and, when it does
not, calls :meth:`StopRequest.time_up`. The limit counts from
``StopRequest.started``: the process's start for the command (a sweep's
runs share it, so the limit is the sweep's deadline), the run's start for a
Python caller of ``train()``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TIME_LIMIT = "time_limit"  # RunResult.reason of a run stopped by trainer.time_limit


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


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back for the duration (delivered when it ends): a few
    steps that must happen together or not at all (in the main thread; elsewhere,
    signals do not arrive anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = set(SIGNALS) - signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal."""
    return 128 + signum


class Interrupted(Exception):
    """Training stopped on request or at its time limit after saving a checkpoint: what
    ``train()`` raises for a Python caller (``RunResult.check``); ``signum`` is None
    for a time limit (``reason`` says ``time_limit``)."""

    def __init__(
        self, signum: int | None, step: int, checkpoint: Path | None, reason: str | None = None
    ) -> None:
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.reason = reason if reason is not None else signal_name(signum) if signum else None


class Abort(KeyboardInterrupt):
    """A second signal: stop at once, without writing anything more."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def process_started(clock: Callable[[], float] = time.monotonic) -> float:
    """``clock()`` at this process's start (Linux: from /proc; elsewhere: now)."""
    try:
        stat = open("/proc/self/stat").read()  # noqa: SIM115 (two tiny reads)
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(open("/proc/uptime").read().split()[0])  # noqa: SIM115
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        age = 0.0
    return clock() - max(0.0, age)


class StopRequest:
    """A flag set by the first SIGTERM/SIGINT (or by :meth:`request`), or by the run's
    time limit (:meth:`time_up`).

    ``started`` is when the time limit starts counting (``clock()``'s time, by default
    now); ``clock`` is the time limit's clock (a test may pass a counter).
    """

    def __init__(
        self, started: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.signum: int | None = None
        self.timed_out = False
        self.clock = clock
        self.started = clock() if started is None else started

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.timed_out

    @property
    def reason(self) -> str | None:
        """Why the run was asked to stop: the signal's name, or ``time_limit``."""
        if self.signum is not None:
            return signal_name(self.signum)
        return TIME_LIMIT if self.timed_out else None

    def request(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = signum

    def time_up(self) -> None:
        """The run's time limit is reached: the same clean stop as a signal's."""
        self.timed_out = True

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


def time_left(limit_s: float, stop: StopRequest) -> float:
    """Seconds left of a limit of ``limit_s`` that counts from ``stop.started``."""
    return stop.started + limit_s - stop.clock()


def start_margin(limit_s: float) -> float:
    """A run (or a sweep's next job) starts only with more than this left of its limit:
    less would end it at its first step, having set up for nothing."""
    return max(5.0, 0.05 * limit_s)


@dataclass
class TimeLimit:
    """When a run with ``trainer.time_limit`` must stop: at the first step after the
    deadline less what a stop costs.

    A stop after step k may also have to evaluate and checkpoint (when k ends an epoch
    or the run; with a validation split, the test set too) and, on a GPU, wait for the
    steps the host has queued ahead of the device (up to ``log_every``, the interval
    between host syncs). Each cost is the last one measured, times a safety factor;
    before the first evaluation, one is taken to cost as much per image as a
    training step (forward only: about three times less), before the first
    checkpoint, a second plus the state's bytes at 50 MB/s.
    """

    limit_s: float
    stop: StopRequest
    eval_images: int  # images an evaluation reads (each evaluated split at the end)
    batch_size: int
    state_bytes: int  # weights and optimizer state: what a checkpoint writes
    log_every: int
    step_s: float | None = None  # seconds per step: a moving average of the host's polls
    eval_s: float | None = None  # the last evaluation's seconds
    checkpoint_s: float | None = None  # the last checkpoint write's seconds
    _last: float | None = field(default=None, repr=False)
    _paused: float = field(default=0.0, repr=False)

    SAFETY = 1.5
    FLOOR_S = 3.0  # the stop's own bookkeeping (summary, event files) and the process's exit

    @property
    def deadline(self) -> float:
        return self.stop.started + self.limit_s

    def left(self) -> float:
        return time_left(self.limit_s, self.stop)

    def needed(self) -> float:
        """Seconds a stop may take after the current step."""
        step = self.step_s or 0.0
        ev = self.eval_s if self.eval_s is not None else step * self.eval_images / self.batch_size
        ck = self.checkpoint_s if self.checkpoint_s is not None else 1.0 + self.state_bytes / 50e6
        return self.SAFETY * (ev + ck + step * (1 + self.log_every)) + self.FLOOR_S

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Measure an evaluation (``eval``) or a checkpoint write (``checkpoint``); their
        time is left out of the step time."""
        t = self.stop.clock()
        yield
        seconds = self.stop.clock() - t
        self._paused += seconds
        if what == "eval":
            self.eval_s = seconds
        else:
            self.checkpoint_s = seconds

    def begin(self) -> None:
        """Training starts: the first step's time counts from here."""
        self._last, self._paused = self.stop.clock(), 0.0

    def reached(self) -> bool:
        """After a step: is it time to stop? (Host time only: no device sync.)"""
        now = self.stop.clock()
        if self._last is not None:
            dt = max(0.0, now - self._last - self._paused)
            self.step_s = dt if self.step_s is None else 0.9 * self.step_s + 0.1 * dt
        self._last, self._paused = now, 0.0
        return now >= self.deadline - self.needed()

    @staticmethod
    def of(limit_s: float | None, stop: StopRequest, **sizes: int) -> TimeLimit | None:
        return None if limit_s is None or math.isinf(limit_s) else TimeLimit(limit_s, stop, **sizes)
