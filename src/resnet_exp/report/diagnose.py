"""The report's section on ``mode=diagnose`` runs: gradient flow at initialisation.

Such a run trains nothing (one forward and backward pass of a fresh net), so it has
no test error, curves or final-error bar: the report lists its measurements and
links the figures the runs and their sweep drew (modes/diagnose.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from resnet_exp.modes.diagnose import OVERLAY_PNG, PNG_NAME
from resnet_exp.report.runs import Run
from resnet_exp.run.result import Status

MODE = "diagnose"


def is_diagnose(run: Run) -> bool:
    return run.config.get("mode") == MODE or run.summary.get("mode") == MODE


def _num(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else ""


def figures(runs: list[Run], sources: list[Path], out: Path) -> list[str]:
    """Relative links from ``out`` to the overlays of the given sweep directories, else
    to each completed run's own figure."""
    overlays = [d / OVERLAY_PNG for d in sources if (d / OVERLAY_PNG).is_file()]
    if not overlays:
        overlays = [
            r.path / PNG_NAME
            for r in runs
            if r.status is Status.completed and (r.path / PNG_NAME).is_file()
        ]
    return [os.path.relpath(p.resolve(), out.resolve()) for p in overlays]


def markdown(runs: list[Run], links: list[str]) -> list[str]:
    """The section: one row per run, its measurements or why it has none."""
    lines = [
        "",
        f"## Gradient flow at initialisation ({len(runs)} runs of mode={MODE})",
        "",
        "One forward and backward pass of a freshly initialised net on one training "
        "batch, nothing trained: gradient norm at the first unit over the last, and the "
        "forward signal's std at the last unit over the first.",
        "",
        "| run | net | block | batch | seed | status | loss | gradient norm first/last "
        "| forward std growth last/first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s, c = r.summary, r.config
        status = r.status.value.replace("_", " ")
        if r.status is not Status.completed and s.get("error"):
            status += f": {s['error']}"
        lines.append(
            f"| `{r.path.name}` | ResNet-{s.get('depth', c.get('depth'))} "
            f"| {s.get('block', c.get('model.block'))} | {s.get('batch_size', c.get('diagnose.batch_size', ''))} "
            f"| {r.seed} | {status} | {_num(s.get('loss'))} "
            f"| {_num(s.get('grad_ratio_first_last'))} "
            f"| {_num(s.get('forward_growth_last_first'))} |"
        )
    if links:
        lines += [""] + [f"![gradient flow]({link})" for link in links]
    return lines
