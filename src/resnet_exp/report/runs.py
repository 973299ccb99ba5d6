"""Reading run directories back: config, status, summary, metrics and curves."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from resnet_exp.config import flatten
from resnet_exp.errors import UserError
from resnet_exp.run.records import METRICS, SUMMARY, read_metrics
from resnet_exp.run.result import Status, SummaryKey
from resnet_exp.train.signal import SIGNAL

CONFIG = Path(".hydra") / "config.yaml"
# Keys that do not change what a run computes: runs that differ only in these
# (and in the seed) are one configuration.
NOT_CONFIGURATION = {
    "seed",
    "resume",
    "dry_run",
    "data.root",
    "data.cache_dir",
    "data.download",
    "trainer.progress",
    "trainer.log_every",
    "trainer.time_limit",  # each window of a run may have its own
    "trainer.track_signal_every",  # measured between steps: training is bit-identical
}


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened, dotted keys, interpolations resolved
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    # (step, ||dE/dx_0|| / ||dE/dx_L||) from signal.jsonl (trainer.track_signal_every)
    first_grad_ratio: list[tuple[int, float]] = field(default_factory=list)

    @property
    def status(self) -> Status:
        """unfinished: no summary (killed, or still running)."""
        return Status.of(self.summary)

    @property
    def seed(self) -> Any:
        """The seed the run used: its summary's, as the config may hold an interpolation
        this process cannot resolve (``seed=${hydra:job.num}``)."""
        return self.summary.get("seed", self.config.get("seed"))

    @property
    def eval_name(self) -> str:
        """The split evaluated during training: test, or val with data.val_size > 0."""
        return "val" if (self.config.get("data.val_size") or 0) > 0 else "test"

    @property
    def test_error(self) -> float | None:
        """Final test error (%); with a validation split, the test set evaluated at the end."""
        s = self.summary
        return s.get(SummaryKey.test_error, s.get(SummaryKey.final(self.eval_name, "error")))

    @property
    def test_error_ema(self) -> float | None:
        """The weight average's final test error (trainer.ema), as ``test_error``."""
        s = self.summary
        return s.get(
            f"{SummaryKey.test_error}_ema",
            s.get(f"{SummaryKey.final(self.eval_name, 'error')}_ema"),
        )

    @property
    def error_curve(self) -> list[tuple[int, float]]:
        key = f"{self.eval_name}_error"
        return [(r["step"], r[key]) for r in self.metrics if r.get(key) is not None]

    def configuration(self) -> tuple[tuple[str, str], ...]:
        """What the run computes, seed aside: the key that groups seeds into one row."""
        return tuple(
            sorted((k, repr(v)) for k, v in self.config.items() if k not in NOT_CONFIGURATION)
        )


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories given, or found below the given directories (multirun sweeps)."""
    found: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d} is not a directory; give run or multirun directories")
        if (d / CONFIG).is_file():
            found.append(d)
            continue
        below = sorted(p.parent.parent for p in d.rglob("config.yaml") if p.parent.name == ".hydra")
        if not below:
            raise UserError(f"no runs in {d}: a run directory holds {CONFIG}")
        found += below
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return sorted(unique, key=_job_order)


def _job_order(path: Path) -> tuple[str, int, str]:
    """Sweep jobs in launch order: `10_x` after `9_x`."""
    m = re.match(r"(\d+)_", path.name)
    return (str(path.parent), int(m.group(1)) if m else -1, path.name)


def load_run(path: Path, curves: bool = True) -> Run:
    raw = OmegaConf.load(path / CONFIG)
    try:
        config = OmegaConf.to_container(raw, resolve=True)
    except Exception:  # an interpolation this process cannot resolve: keep it as written
        config = OmegaConf.to_container(raw, resolve=False)
    summary_path = path / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    flat = {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(config).items()}  # type: ignore[arg-type]
    run = Run(path, flat, summary, read_metrics(path / METRICS))
    if curves:
        run.train_loss = _train_loss_curve(run)
        run.first_grad_ratio = _first_grad_ratio(path / SIGNAL)
    return run


def load_runs(dirs: list[Path], curves: bool = True) -> list[Run]:
    return [load_run(p, curves) for p in find_runs(dirs)]


def _train_loss_curve(run: Run) -> list[tuple[int, float]]:
    """Training loss every `log_every` steps from TensorBoard's events (finer than the
    per-epoch means in metrics.jsonl, which are the fallback)."""
    if any(run.path.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run.path), size_guidance={"scalars": 0})
        tb_log = logging.getLogger("tensorboard")
        level = tb_log.level
        tb_log.setLevel(logging.WARNING)  # it logs every file it reads at INFO
        try:
            acc.Reload()
        finally:
            tb_log.setLevel(level)
        if "train/loss" in acc.Tags().get("scalars", []):
            points = {e.step: e.value for e in acc.Scalars("train/loss")}  # a resume rewrites steps
            return sorted(points.items())
    return [(r["step"], r["train_loss"]) for r in run.metrics if r.get("train_loss") is not None]


def _first_grad_ratio(path: Path) -> list[tuple[int, float]]:
    """The first unit's gradient ratio at each measured step (a non-finite one, written
    as null, left out)."""
    out = []
    for row in read_metrics(path):
        units = row.get("units") or [{}]
        ratio = units[0].get("grad_ratio")
        if isinstance(ratio, (int, float)) and math.isfinite(ratio):
            out.append((int(row["step"]), float(ratio)))
    return out
