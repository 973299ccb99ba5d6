"""Progress output: a tqdm bar on a terminal, plain lines in a file.

A bar written to a file (SLURM logs, nohup, ``| tee``) leaves a carriage-return
update per step; when stderr is not a terminal the run logs one line per
``log_every`` steps instead: step, epoch, loss, error, images/s and time left.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("resnet_exp")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``enabled=False``: nothing (trainer.progress=false, or not rank 0)."""

    def __init__(
        self,
        start: int,
        total: int,
        steps_per_epoch: int,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        stream = stream or sys.stderr
        self.total, self.steps_per_epoch = total, steps_per_epoch
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.start, self.t0 = start, time.perf_counter()
        self.bar: tqdm | None = None
        if self.tty:
            self.bar = tqdm(
                total=total, initial=start, file=stream, dynamic_ncols=True, leave=False
            )

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update()
            if step % self.steps_per_epoch == 1 or self.steps_per_epoch == 1:
                epochs = -(-self.total // self.steps_per_epoch)
                self.bar.set_description(f"epoch {(step - 1) // self.steps_per_epoch + 1}/{epochs}")

    def logged(self, step: int, loss: float, error: float, images_per_s: float) -> None:
        """A logging step: the bar's numbers, or one line."""
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.3f}", err=f"{error:.1f}%", img_s=f"{images_per_s:.0f}"
            )
            return
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
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
