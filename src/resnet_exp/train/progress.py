"""Progress output: a tqdm bar on a terminal, plain lines in a file, and an early
estimate of the run's length.

A bar written to a file (SLURM logs, nohup, ``| tee``) leaves a carriage-return
update per step; when stderr is not a terminal the run logs one line per
``log_every`` steps instead: step, epoch, loss, error, images/s and time left.

A few seconds into the run (``ESTIMATE_AFTER_S``, at least ``ESTIMATE_MIN_STEPS``
steps after the first ``SKIPPED_STEPS``) one line gives the steps/s measured so far
and the time the run's steps will take at that rate, in the log and in the bar's
description: a default job that takes days on a laptop says so within a minute.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("resnet_exp")

# The first steps pay one-off costs (allocation, cuDNN autotuning, CUDA-graph capture,
# torch.compile): the estimate times the steps after them.
SKIPPED_STEPS = 2
# The estimate's window. The clock is read on the host and never waits for the device:
# on a GPU the host may run ahead of the device, but by no more than the steps between
# two logging steps (each one syncs, train/metrics.py), which a 10-second window makes
# a small part of what it measures.
ESTIMATE_AFTER_S = 10.0
ESTIMATE_MIN_STEPS = 5


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def duration(seconds: float) -> str:
    """``42h 18m``, ``11m 24s``, ``48s``: a length to read at a glance."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    if h >= 24:
        return f"{h // 24}d {h % 24}h"
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


class Progress:
    """``enabled=False``: nothing (trainer.progress=false, or not rank 0)."""

    def __init__(
        self,
        start: int,
        total: int,
        steps_per_epoch: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        stream = stream or sys.stderr
        self.total, self.steps_per_epoch = total, steps_per_epoch
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.clock = clock
        self.start, self.t0 = start, clock()
        self.mark: tuple[int, float] | None = None  # (step, time) where the estimate's window opens
        self.estimate: str | None = None  # the run's length, once measured ("42h 18m")
        self.bar: tqdm | None = None
        if self.tty:
            self.bar = tqdm(
                total=total, initial=start, file=stream, dynamic_ncols=True, leave=False
            )

    def step(self, step: int) -> None:
        if self.enabled and self.estimate is None:
            self._time(step)
        if self.bar is not None:
            self.bar.update()
            if step % self.steps_per_epoch == 1 or self.steps_per_epoch == 1:
                self._describe(step)

    def _describe(self, step: int) -> None:
        assert self.bar is not None
        epochs = -(-self.total // self.steps_per_epoch)
        text = f"epoch {(step - 1) // self.steps_per_epoch + 1}/{epochs}"
        if self.estimate is not None:
            text += f", {self.estimate} in all"
        self.bar.set_description(text)

    def _time(self, step: int) -> None:
        """Open the estimate's window after the skipped steps; close it, once, with one
        line when it is long enough (no device sync: a clock reading per step)."""
        now = self.clock()
        if step - self.start == SKIPPED_STEPS:
            self.mark = (step, now)
            return
        if self.mark is None:
            return
        steps, seconds = step - self.mark[0], now - self.mark[1]
        if steps < ESTIMATE_MIN_STEPS or seconds < ESTIMATE_AFTER_S or step >= self.total:
            return
        rate = steps / seconds
        left = (self.total - step) / rate
        self.estimate = duration(now - self.t0 + left)
        resumed = f" from step {self.start:,}" if self.start else ""
        log.info(
            "estimated length: %s for %s steps%s at %.3g steps/s (%.3g s a step, timed over "
            "steps %d-%d; evaluations and checkpoints add to it); %s left",
            self.estimate,
            f"{self.total - self.start:,}",
            resumed,
            rate,
            1 / rate,
            self.mark[0] + 1,
            step,
            duration(left),
        )
        if self.bar is not None:
            self._describe(step)

    def logged(self, step: int, loss: float, error: float, images_per_s: float) -> None:
        """A logging step: the bar's numbers, or one line."""
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.3f}", err=f"{error:.1f}%", img_s=f"{images_per_s:.0f}"
            )
            return
        if not self.enabled:
            return
        elapsed = self.clock() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done else 0.0
        epoch = (step - 1) // self.steps_per_epoch + 1
        log.info(
            "step %d/%d epoch %d | loss %.4f err %.2f%% | %.0f img/s | ETA %s",
            step,
            self.total,
            epoch,
            loss,
            error,
            images_per_s,
            _clock(eta),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
