"""What a run leaves in its directory: TensorBoard events, metrics.jsonl, summary.json;
and, with ``logger=mlflow``, the same in an MLflow run (run/tracking.py, which
``RunRecords`` forwards to).

summary.json's content is a run's ``RunResult`` (run/result.py, which names
its keys once); this module writes it.
"""

from __future__ import annotations

import json
import math
import os
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from resnet_exp.run.result import Status, SummaryKey
from resnet_exp.run.tracking import MlflowRun, Tracking

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


# Config keys shown as hyperparameters in TensorBoard's HPARAMS tab (dotted; a
# trailing dot takes the whole section).
HPARAM_KEYS = (
    "model.",
    "depth",
    "seed",
    "data.name",
    "data.batch_size",
    "data.train_limit",
    "optimizer.name",
    "optimizer.lr",
    "optimizer.weight_decay",
    "schedule.name",
    "trainer.epochs",
    "trainer.max_steps",
    "trainer.precision",
    "scale.name",
    "init_from.",
    # beyond the paper's recipe (docs/fidelity.md)
    "trainer.label_smoothing",
    "trainer.ema.decay",
    "data.cutout",
    "data.mixup_alpha",
    "data.cutmix_alpha",
)
# Summary values logged as the HPARAMS tab's metrics: the errors at the end of the
# run only. A lowest-over-evaluations error is selected on the split it reports,
# and sorting runs by it in TensorBoard would select on the test set.
HPARAM_METRICS = (
    SummaryKey.final("test", "error"),
    SummaryKey.final("val", "error"),  # with a validation split
    SummaryKey.test_error,  # with a validation split: the test set, once, at the end
    SummaryKey.final_train_error,
    SummaryKey.pruned_at_epoch,
    # the weight average's (trainer.ema), where a run kept one
    SummaryKey.final("test", "error_ema"),
    SummaryKey.final("val", "error_ema"),
    f"{SummaryKey.test_error}_ema",
)


class RunRecords:
    """One writer per run; only rank 0 writes (``enabled=False`` elsewhere).

    ``tracking`` says where besides: TensorBoard (on unless ``logger.tensorboard=false``),
    an MLflow run (``logger=mlflow``). A context manager: ``with RunRecords(run_dir) as
    records:`` closes the writers however the run ends.
    """

    def __init__(
        self,
        run_dir: Path,
        start_step: int = 0,
        enabled: bool = True,
        tracking: Tracking | None = None,
    ) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.writer: SummaryWriter | None = None
        self.mlflow: MlflowRun | None = None
        tracking = tracking or Tracking()
        if not enabled:
            return
        if tracking.mlflow is not None:  # first: a store that cannot be used leaves no files
            self.mlflow = MlflowRun.open(tracking)
        if tracking.tensorboard:
            # purge_step drops events after the checkpoint, which a resumed run writes again.
            self.writer = SummaryWriter(
                str(run_dir), purge_step=start_step + 1 if start_step else None
            )
        if start_step:
            truncate_rows(run_dir / METRICS, start_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.mlflow is not None:
            self.mlflow.scalars(step, values)

    def evaluation(
        self,
        step: int,
        before: dict[str, Any],
        split: str,
        values: dict[str, float],
        after: dict[str, Any],
    ) -> None:
        """An evaluation on ``split`` at ``step``: its values in TensorBoard (``test/error``)
        and one metrics.jsonl row (step, ``before``, the values as ``test_error``, ``after``;
        appended, flushed at once)."""
        self.scalars(step, {f"{split}/{k}": v for k, v in values.items()})
        if not self.enabled:
            return
        named = {f"{split}_{k}": v for k, v in values.items()}
        row = {"step": step, **before, **named, **after}
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
        if self.writer is not None:
            self.writer.flush()

    def append(self, name: str, row: dict[str, Any]) -> None:
        """One row appended to the run's JSON-lines file ``name`` (flushed at once)."""
        if self.enabled:
            with open(self.run_dir / name, "a") as f:
                f.write(json.dumps(_clean(row)) + "\n")

    def summary(self, summary: dict[str, Any], config: dict[str, Any] | None = None) -> None:
        """Write summary.json; with the run's ``config`` (dotted keys), also its HPARAMS entry."""
        if self.enabled:
            write_json(self.run_dir / SUMMARY, summary)
        if self.writer is not None and config is not None:
            self._hparams(config, summary)
        if self.mlflow is not None:  # its results once it ended (``config``), as HPARAMS
            files = [self.run_dir / SUMMARY, self.run_dir / METRICS]
            self.mlflow.finish(summary, ended=config is not None, files=files)

    def _hparams(self, config: dict[str, Any], summary: dict[str, Any]) -> None:
        # SummaryWriter.add_hparams would write into a new sub-run per call;
        # this run's own file writer keeps the entry next to its scalars.
        params = {k: _hparam_value(v) for k, v in config.items() if _shown(k)}
        params[SummaryKey.status] = Status.of(summary).value
        metrics = {
            f"hparams/{k}": float(summary[k])
            for k in HPARAM_METRICS
            if isinstance(summary.get(k), (int, float)) and math.isfinite(summary[k])
        }
        step = int(summary.get(SummaryKey.steps_done) or 0)
        for proto in hparams(params, metrics):
            self.writer.file_writer.add_summary(proto, step)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.close()

    def __enter__(self) -> RunRecords:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
    os.replace(tmp, path)


def _shown(key: str) -> bool:
    return any(key.startswith(k) if k.endswith(".") else key == k for k in HPARAM_KEYS)


def _hparam_value(v: Any) -> int | float | str | bool:
    """TensorBoard takes numbers, strings and booleans (None and lists become text)."""
    return v if isinstance(v, (int, float, str, bool)) else str(v)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_rows(path: Path, step: int) -> None:
    """Keep the rows up to ``step``: a resumed run rewrites what came after."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
