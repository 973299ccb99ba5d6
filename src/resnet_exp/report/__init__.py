"""Sweep reports: a table per configuration (report.md, report.csv) and PNG figures."""

from __future__ import annotations

from pathlib import Path

from resnet_exp.report.figures import curves, final_errors, signal
from resnet_exp.report.runs import Run, load_runs
from resnet_exp.report.tables import Row, group_rows, markdown, write_csv

REPORT_MD, REPORT_CSV = "report.md", "report.csv"
CURVES_PNG, ERRORS_PNG, SIGNAL_PNG = "curves.png", "final_error.png", "signal.png"

__all__ = ["Row", "Run", "group_rows", "load_runs", "write_report"]


def write_report(dirs: list[Path], out: Path) -> list[Path]:
    """Read the runs in ``dirs`` (run or multirun directories) and write the report
    into ``out``; returns the files written, report.md first."""
    runs = load_runs(dirs)
    rows = group_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = [curves(rows, out / CURVES_PNG), final_errors(rows, out / ERRORS_PNG)]
    if any(run.first_grad_ratio for run in runs):  # some run tracked its signal
        figures.append(signal(rows, out / SIGNAL_PNG))
    md = out / REPORT_MD
    md.write_text(markdown(rows, [Path(d) for d in dirs], figures))
    write_csv(rows, out / REPORT_CSV)
    return [md, out / REPORT_CSV, *figures]
