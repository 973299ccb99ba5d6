"""Each unit ordering against the original unit: the difference of median errors over
seeds, with a 95% bootstrap interval (the paper gives medians only)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Row(Protocol):
    """What is read of a report row (report/tables.py's ``Row``, which uses this module)."""

    runs: list[Any]

    @property
    def label(self) -> str: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def errors(self) -> list[float]: ...


ORIGINAL = "original"
RESAMPLES = 10_000


def median_difference_interval(
    base: list[float], other: list[float], level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of median(other) - median(base): each group's
    seeds resampled with replacement, ``RESAMPLES`` times (a fixed generator: the same
    report every time)."""
    rng = np.random.default_rng(seed)
    a = rng.choice(np.asarray(base), size=(RESAMPLES, len(base)))
    b = rng.choice(np.asarray(other), size=(RESAMPLES, len(other)))
    diffs = np.median(b, axis=1) - np.median(a, axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Comparison:
    row: Row  # an ordering
    base: Row  # the original unit, everything else equal
    difference: float  # median error difference, percentage points
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (with at least 2 seeds on each side)."""
        enough = min(len(self.row.errors), len(self.base.errors)) >= 2
        return enough and (self.low > 0 or self.high < 0)


def _without_block(row: Row) -> tuple:
    return tuple(kv for kv in row.runs[0].configuration() if kv[0] != "model.block")


def against_original(rows: list[Row]) -> list[Comparison]:
    """Each row whose unit is not the original, against the row that differs from it
    only in ``model.block`` and has the original unit (both with completed runs)."""
    bases = {
        _without_block(r): r for r in rows if r.config.get("model.block") == ORIGINAL and r.errors
    }
    out = []
    for row in rows:
        base = bases.get(_without_block(row))
        if base is None or row is base or not row.errors:
            continue
        low, high = median_difference_interval(base.errors, row.errors)
        diff = statistics.median(row.errors) - statistics.median(base.errors)
        out.append(Comparison(row, base, diff, low, high))
    return out


def markdown(comparisons: list[Comparison]) -> list[str]:
    if not comparisons:
        return []
    lines = [
        "",
        "## Each ordering against the original unit",
        "",
        "| configuration | seeds (vs original) | median error − original's (points) "
        "| 95% bootstrap interval | resolved |",
        "|---|---|---|---|---|",
    ]
    for c in comparisons:
        seeds = f"{len(c.row.errors)} ({len(c.base.errors)})"
        verdict = "yes" if c.resolved else "no"
        lines.append(
            f"| {c.row.label} | {seeds} | {c.difference:+.2f} | [{c.low:+.2f}, {c.high:+.2f}] "
            f"| {verdict} |"
        )
    lines += [
        "",
        "The interval resamples each configuration's seeds with replacement "
        f"({RESAMPLES:,} times) and takes the 2.5th and 97.5th percentiles of the difference "
        "of medians; resolved: it excludes 0, with at least 2 seeds on each side. With 3-5 "
        "seeds the interval is coarse: it shows how far the seeds let one tell orderings apart, "
        "not a test the paper made (it gives medians only).",
    ]
    return lines
