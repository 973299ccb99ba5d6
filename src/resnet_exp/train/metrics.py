"""The running values a run carries from step to step, and across a resume.

``RunningMetrics`` owns them: loss and error sums over the logging interval and
over the epoch (kept on the device, read with one host sync), the first
non-finite step, the last logged and evaluated values, the best error and the
throughput history. Like the loader, it has ``state_dict``/``load_state_dict``:
a checkpoint holds it beside the model's and the optimizer's, and a resumed run
computes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from resnet_exp.run import distributed


@dataclass
class Mean:
    """A host-side loss and error (%) over some images, summed over the ranks."""

    loss: float
    error: float


class Window:
    """Loss and wrong-prediction sums over a span of steps, on the device."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.wrong = torch.zeros((), device=device)
        self.seen = 0  # images on this rank (a host int: no sync)

    def add(self, loss: torch.Tensor, wrong: torch.Tensor, n: int) -> None:
        self.loss += loss * n
        self.wrong += wrong
        self.seen += n

    def reset(self) -> None:
        self.loss.zero_(), self.wrong.zero_()
        self.seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss.cpu(), "wrong_sum": self.wrong.cpu(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.copy_(state["loss_sum"]), self.wrong.copy_(state["wrong_sum"])
        self.seen = state["seen"]


class RunningMetrics:
    def __init__(self, device: torch.device, world: int = 1) -> None:
        self.world = world
        self.interval, self.epoch = Window(device), Window(device)
        self.bad_step = torch.full((), -1, device=device, dtype=torch.int64)  # -1: none yet
        self._step = torch.zeros((), device=device, dtype=torch.int64)
        self.last_interval = Mean(math.nan, math.nan)  # the last logged interval's train means
        self.last_eval: dict[str, float] = {}  # e.g. {"test_loss": ..., "test_error": ...}
        self.best = math.inf  # the lowest error of the scheduled evaluations
        self.throughput: list[tuple[int, float]] = []  # (images, seconds) per interval

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """After a step: add its loss and errors; remember the first non-finite step.
        Device ops only, no host sync. ``y``: labels, or soft targets (a mixed batch),
        whose error is measured against each image's dominant label."""
        self._step += 1
        loss = loss.float()
        bad = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(bad, self._step, self.bad_step)
        labels = y if y.ndim == 1 else y.argmax(1)
        wrong = (logits.argmax(1) != labels).sum()
        self.interval.add(loss, wrong, len(y))
        self.epoch.add(loss, wrong, len(y))

    def reduce(self) -> tuple[int | None, Mean, Mean]:
        """One host sync: the first non-finite step (None: none; the earliest over the
        ranks) and the interval's and the epoch's means over all ranks (each rank's sums
        and image counts added: a run continued on another number of processes keeps
        its partial sums on one rank)."""
        windows = (self.interval, self.epoch)
        sums = [t.double() for w in windows for t in (w.loss, w.wrong)]
        seen = torch.tensor([float(w.seen) for w in windows], dtype=torch.float64)
        values = torch.cat(
            [torch.stack(sums), seen.to(sums[0].device), self.bad_step.double()[None]]
        )
        values[-1] = torch.where(values[-1] < 0, math.inf, values[-1])
        if self.world > 1:
            distributed.sum_(values[:-1])
            distributed.min_(values[-1:])
        *totals, bad = values.tolist()
        means = []
        for i in range(len(windows)):
            n = max(totals[2 * len(windows) + i], 1.0)
            means.append(Mean(totals[2 * i] / n, 100.0 * totals[2 * i + 1] / n))
        return (None if math.isinf(bad) else int(bad)), means[0], means[1]

    def steady_throughput(self) -> float:
        """Images/s over all logging intervals but the first (start-up, autotuning, compiling)."""
        rest = self.throughput[1:] or self.throughput
        images, seconds = sum(h[0] for h in rest), sum(h[1] for h in rest)
        return images / seconds if seconds > 0 else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval.state_dict(),
            "epoch": self.epoch.state_dict(),
            "step": int(self._step),
            "train_loss": self.last_interval.loss,
            "train_error": self.last_interval.error,
            "last_eval": dict(self.last_eval),
            "best_error": self.best,
            "throughput": list(self.throughput),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.interval.load_state_dict(state["interval"])
        self.epoch.load_state_dict(state["epoch"])
        self._step.fill_(state["step"])
        self.last_interval = Mean(state["train_loss"], state["train_error"])
        self.last_eval = dict(state["last_eval"])
        self.best = state["best_error"]
        self.throughput = list(state["throughput"])


class RunClock:
    """A run's wall time over all its parts: a resumed run counts its whole length
    (what earlier parts took, kept in the checkpoint) and how many parts it ran in."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started  # this part's
        self.before_s, self.parts = 0.0, 1

    def wall_time(self) -> float:
        """Seconds of the whole run so far: earlier parts and this one."""
        return self.before_s + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"wall_time_s": self.wall_time(), "parts": self.parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The run so far; this process continues it as its next part."""
        self.before_s, self.parts = float(state["wall_time_s"]), int(state["parts"]) + 1
