"""What a run leaves in its directory: TensorBoard events, metrics.jsonl, summary.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class RunRecords:
    """One writer per run; only rank 0 writes (``enabled=False`` elsewhere)."""

    def __init__(self, run_dir: Path, start_step: int = 0, enabled: bool = True) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.writer: SummaryWriter | None = None
        if enabled:
            # purge_step drops events after the checkpoint, which a resumed run writes again.
            self.writer = SummaryWriter(
                str(run_dir), purge_step=start_step + 1 if start_step else None
            )
            if start_step:
                _truncate_metrics(run_dir / METRICS, start_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def evaluation(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row per evaluation (appended, flushed at once)."""
        if not self.enabled:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
        if self.writer is not None:
            self.writer.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            write_json(self.run_dir / SUMMARY, summary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows up to ``step``: a resumed run rewrites what came after."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
