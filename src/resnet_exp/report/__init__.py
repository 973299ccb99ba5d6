"""Sweep reports: a table per configuration (report.md, report.csv) and PNG figures;
``mode=diagnose`` runs in a section of their own (report/diagnose.py)."""

from __future__ import annotations

from pathlib import Path

from resnet_exp.report import diagnose
from resnet_exp.report.figures import curves, final_errors
from resnet_exp.report.runs import Run, load_runs
from resnet_exp.report.tables import Row, group_rows, markdown, write_csv

REPORT_MD, REPORT_CSV = "report.md", "report.csv"
CURVES_PNG, ERRORS_PNG = "curves.png", "final_error.png"

__all__ = ["Row", "Run", "group_rows", "load_runs", "write_report"]


def write_report(dirs: list[Path], out: Path) -> list[Path]:
    """Read the runs in ``dirs`` (run or multirun directories) and write the report
    into ``out``; returns the files written, report.md first.

    Training runs get the table (and report.csv) and the figures that have something
    to draw: curves once a run logged a point, final errors once a row has one.
    """
    runs = load_runs(dirs)
    diagnosed = [r for r in runs if diagnose.is_diagnose(r)]
    trained = [r for r in runs if not diagnose.is_diagnose(r)]
    rows = group_rows(trained) if trained else []
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if any(r.train_loss or r.error_curve for row in rows for r in row.runs):
        figures.append(curves(rows, out / CURVES_PNG))
    if any(row.median is not None for row in rows):
        figures.append(final_errors(rows, out / ERRORS_PNG))
    text = markdown(rows, [Path(d) for d in dirs], figures)
    if diagnosed:
        links = diagnose.figures(diagnosed, [Path(d) for d in dirs], out)
        text += "\n".join(diagnose.markdown(diagnosed, links)) + "\n"
    md = out / REPORT_MD
    md.write_text(text)
    tables = [md]
    if rows:
        write_csv(rows, out / REPORT_CSV)
        tables.append(out / REPORT_CSV)
    return [*tables, *figures]
