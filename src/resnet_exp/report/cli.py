"""The `resnet-exp-report` command: a report from run or multirun directories."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from resnet_exp.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="resnet-exp-report",
        description="Summarise resnet-exp runs: report.md, report.csv and PNG figures, "
        "one row per configuration (seeds aggregated).",
    )
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a multirun or run directory")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        help="where to write (default: DIR when one is given, else the DIRs' common parent)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out
    if out is None:
        dirs = [d.resolve() for d in args.dirs]
        out = dirs[0] if len(dirs) == 1 else Path(os.path.commonpath(dirs))
    try:
        from resnet_exp.report import write_report

        written = write_report(args.dirs, out)
    except UserError as e:
        print(f"resnet-exp-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(path)
