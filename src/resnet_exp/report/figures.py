"""The report's PNG figures (matplotlib's Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from resnet_exp.report.tables import Row
from resnet_exp.run.result import Status

PANEL_FACETS = ("dataset", "net")


def _panels(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows split into panels by data set and net when something else varies too
    (as the paper's Fig. 6 draws one panel per depth)."""
    keys = [k for k in PANEL_FACETS if k in rows[0].parts]
    if all(set(r.parts) <= set(keys) for r in rows):
        keys = []
    panels: dict[str, list[Row]] = {}
    for row in rows:
        panels.setdefault(" · ".join(row.parts[k] for k in keys), []).append(row)
    return panels


def _line_label(row: Row, panel_title: str) -> str:
    return (
        ", ".join(v for v in row.parts.values() if v not in panel_title.split(" · ")) or row.label
    )


def curves(rows: list[Row], path: Path) -> Path:
    """Training loss and test error against iterations, one colour per configuration,
    one line per seed (the paper's Fig. 1 and 6)."""
    curves_figure(rows).savefig(path, dpi=90)
    return path


def curves_figure(rows: list[Row]) -> Figure:
    panels = _panels(rows)
    colors = matplotlib.colormaps["tab10" if len(rows) <= 10 else "tab20"]
    fig = Figure(figsize=(11, 0.6 + 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (title, prows), (ax_loss, ax_err) in zip(panels.items(), axes):
        losses: list[float] = []
        for i, row in enumerate(prows):
            color = colors(i % colors.N)
            label = _line_label(row, title)
            for j, run in enumerate(row.runs):
                name = label if j == 0 else None
                if run.train_loss:
                    steps, loss = zip(*run.train_loss)
                    losses += loss
                    # A run shorter than log_every has one point: a line of one point is invisible.
                    style = (
                        {"marker": "o", "ms": 5} if len(steps) == 1 else {"lw": 1, "alpha": 0.85}
                    )
                    ax_loss.plot(steps, loss, color=color, label=name, **style)
                    if run.status is Status.diverged:
                        ax_loss.plot(steps[-1], loss[-1], "x", color=color, ms=8)
                if run.error_curve:
                    steps, err = zip(*run.error_curve)
                    # a dot per evaluation while they can be told apart (164 at full length cannot)
                    marker = "o" if len(steps) == 1 else "." if len(steps) <= 40 else None
                    ax_err.plot(steps, err, color=color, lw=1.5, marker=marker, label=name)
        _loss_axis(ax_loss, [v for v in losses if math.isfinite(v)])
        ax_loss.set_ylabel("training loss")
        ax_err.set_ylabel("test error (%)")
        for ax in (ax_loss, ax_err):
            ax.set_xlabel("iterations")
            ax.grid(True, which="both", alpha=0.3)
            if title:
                ax.set_title(title)
        if ax_err.get_legend_handles_labels()[0]:  # runs stopped before any evaluation have none
            ax_err.legend(fontsize="small", loc="upper right")
    return fig


def _loss_axis(ax: Axes, losses: list[float]) -> None:
    """Log scale (the paper's) where the losses span at least a factor of 3; a narrow
    range (a short run) stays linear, where the default ticks keep distinct labels
    (log ticks there sit closer than two digits tell apart: "2.3, 2.3, 2.3")."""
    if not losses or min(losses) <= 0 or max(losses) / min(losses) < 3:
        return
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    # 0.3, 2: not 3x10^-1; the 2-9 ticks between decades are labelled over a short span only
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    few_decades = math.log10(hi / lo) < 1.5
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g") if few_decades else NullFormatter())


def _paper_value(text: str | None) -> float | None:
    m = re.match(r"\d+(\.\d+)?", text or "")
    return float(m.group()) if m else None


def final_errors(rows: list[Row], path: Path) -> Path:
    """Median final test error per configuration; whiskers span the seeds, a diamond
    marks the paper's number."""
    fig = Figure(figsize=(8, 1.2 + 0.4 * len(rows)), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(rows)))[::-1]
    for y, row in zip(ys, rows):
        if row.median is None:
            ax.text(0.5, y, " / ".join(sorted({r.status.value for r in row.runs})), va="center")
            continue
        errs = row.errors
        whisker = [[row.median - min(errs)], [max(errs) - row.median]] if len(errs) > 1 else None
        ax.barh(y, row.median, color="tab:blue", alpha=0.8, xerr=whisker, capsize=3)
        ax.text(max(errs), y, f"  {row.median:.2f}", va="center", fontsize="small")
    paper = [(y, _paper_value(r.paper)) for y, r in zip(ys, rows) if _paper_value(r.paper)]
    if paper:
        ax.plot([p for _, p in paper], [y for y, _ in paper], "kD", ms=5, label="paper")
        ax.legend(loc="lower right", fontsize="small")
    ax.set_yticks(ys, [r.label for r in rows])
    ax.set_xlabel("final test error (%), median over seeds")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=90)
    return path


def signal(rows: list[Row], path: Path) -> Path:
    """The first unit's gradient ratio over training, one line per configuration (the
    ordering, in a sweep over orderings), the median over its seeds at each step."""
    signal_figure(rows).savefig(path, dpi=90)
    return path


def signal_figure(rows: list[Row]) -> Figure:
    colors = matplotlib.colormaps["tab10" if len(rows) <= 10 else "tab20"]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn: list[float] = []
    for i, row in enumerate(rows):
        by_step: dict[int, list[float]] = {}
        for run in row.runs:
            for step, ratio in run.first_grad_ratio:
                by_step.setdefault(step, []).append(ratio)
        if not by_step:
            continue
        steps = sorted(by_step)
        medians = [statistics.median(by_step[s]) for s in steps]
        drawn += medians
        seeds = max(len(v) for v in by_step.values())
        style = {"marker": "o", "ms": 5} if len(steps) == 1 else {"lw": 1.5}
        label = f"{row.label} ({seeds} seed{'s' if seeds > 1 else ''})"
        ax.plot(steps, medians, color=colors(i % colors.N), label=label, **style)
    if drawn and min(drawn) > 0 and max(drawn) / min(drawn) >= 10:
        ax.set_yscale("log")
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("iterations")
    ax.set_ylabel(r"$\|\partial E/\partial x_0\| \,/\, \|\partial E/\partial x_L\|$")
    ax.set_title(
        "gradient reaching the first unit, relative to the last (Eq. 5; median over seeds)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return fig
