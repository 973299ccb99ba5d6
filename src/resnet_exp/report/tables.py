"""One row per configuration: seeds aggregated, the paper's number beside it."""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resnet_exp.report import compare
from resnet_exp.report.paper import RECIPE_KEYS, paper_error, paper_net, recipe_text, shortcut_text
from resnet_exp.report.runs import NOT_CONFIGURATION, Run
from resnet_exp.run.result import Status, SummaryKey

DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet"}


@dataclass
class Row:
    parts: dict[str, str]  # what names this configuration among the others: facet -> text
    runs: list[Run]

    @property
    def label(self) -> str:
        return ", ".join(self.parts.values())

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if _done(r)]

    @property
    def errors(self) -> list[float]:
        return [r.test_error for r in self.completed]  # type: ignore[misc]

    @property
    def median(self) -> float | None:
        return statistics.median(self.errors) if self.errors else None

    @property
    def errors_ema(self) -> list[float]:
        """The weight average's final test errors (trainer.ema), of the runs that have one."""
        return [r.test_error_ema for r in self.completed if r.test_error_ema is not None]

    @property
    def median_ema(self) -> float | None:
        return statistics.median(self.errors_ema) if self.errors_ema else None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.errors) if self.errors else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (none for a single run)."""
        return statistics.stdev(self.errors) if len(self.errors) > 1 else None

    @property
    def params(self) -> int | None:
        return next((r.summary["params"] for r in self.runs if "params" in r.summary), None)

    def _median_of(self, key: str) -> float | None:
        values = [r.summary[key] for r in self.completed if r.summary.get(key) is not None]
        return statistics.median(values) if values else None

    def crops(self) -> list[int]:
        """Test crop sizes of streamed data (the first one's metrics have no suffix)."""
        return [int(c) for c in (self.config.get("data.eval_crops") or ())]

    def crop_errors(self) -> list[tuple[int, float | None, float | None]]:
        """(crop, median top-1, median top-5) per test crop."""
        out = []
        for i, crop in enumerate(self.crops()):
            suffix = "" if i == 0 else f"_{crop}"
            out.append(
                (
                    crop,
                    self._median_of(f"final_test_error{suffix}"),
                    self._median_of(f"final_test_top5_error{suffix}"),
                )
            )
        return out

    @property
    def images_per_s(self) -> float | None:
        return self._median_of("train_images_per_s")

    @property
    def wall_time_s(self) -> float | None:
        return self._median_of("wall_time_s")

    @property
    def paper(self) -> str | None:
        return paper_error(self.config)

    @property
    def not_completed(self) -> list[Run]:
        return [r for r in self.runs if not _done(r)]


def _done(run: Run) -> bool:
    return run.status is Status.completed and run.test_error is not None


def _resumable(run: Run) -> bool:
    """Stopped with a checkpoint (a time limit, a signal) or not started: to be continued."""
    return run.status in (Status.interrupted, Status.not_started)


def _status_text(run: Run) -> str:
    reason = run.summary.get(SummaryKey.reason) or run.summary.get(SummaryKey.signal)
    text = run.status.value.replace("_", " ")
    return f"{text} ({reason.replace('_', ' ')})" if reason else text


def _progress(run: Run) -> str:
    """``step x of y (z%)``."""
    done, total = run.summary.get(SummaryKey.steps_done), run.summary.get(SummaryKey.steps)
    if not done or not total:
        return "step 0"
    return f"step {done:,} of {total:,} ({100 * done / total:.0f}%)"


def _last_evaluation(run: Run) -> str:
    """The last evaluation's error and where it was made."""
    key = f"{run.eval_name}_error"
    rows = [r for r in run.metrics if r.get(key) is not None]
    if not rows:
        return "none yet"
    last = rows[-1]
    return (
        f"{run.eval_name} error {last[key]:.2f}% at step {last['step']:,} (epoch {last['epoch']})"
    )


def facets(config: dict[str, Any]) -> dict[str, str]:
    """The parts a configuration is named by, in reading order."""
    unit = config.get("model.unit")
    net = f"ResNet-{config.get('depth')}" + (" 1-layer skips" if unit == "single" else "")
    name = str(config.get("data.name"))
    return {
        "dataset": DATASETS.get(name, name),
        "net": net,
        "block": str(config.get("model.block")),
        "shortcut": shortcut_text(config),
        "batch": f"batch {config.get('data.batch_size')}",
        "recipe": recipe_text(config),
    }


def group_rows(runs: list[Run]) -> list[Row]:
    """Runs grouped by configuration (seed aside), in the order they were launched.

    A row is named by what differs between the rows: the facets above, then
    any other differing key as ``key=value``.
    """
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.configuration(), []).append(r)
    firsts = [g[0].config for g in groups.values()]
    named = [k for k in facets(firsts[0]) if len({facets(c)[k] for c in firsts}) > 1]
    covered = {"data.name", "depth", "model.unit", "model.block", "data.batch_size", *RECIPE_KEYS}
    others = sorted(
        k
        for k in set().union(*firsts)
        if k not in covered
        and k not in NOT_CONFIGURATION
        and not k.startswith("model.shortcut.")
        and len({repr(c.get(k)) for c in firsts}) > 1
    )
    if not named and not others:
        named = ["net", "block", "shortcut"]
    rows = []
    for group in groups.values():
        c = group[0].config
        parts = {k: facets(c)[k] for k in named} | {k: f"{k}={_readable(c.get(k))}" for k in others}
        rows.append(Row(parts, group))
    return rows


def _stopped_at(r: Run) -> str:
    """Where a run that did not complete stopped."""
    s, k = r.summary, SummaryKey
    if k.diverged_at_step in s:
        return f"non-finite loss at step {s[k.diverged_at_step]}"
    if s.get(k.pruned_at_epoch) is not None:
        err = s.get(k.final(r.eval_name, "error"))
        shown = f", {r.eval_name} error {err:.2f}%" if isinstance(err, (int, float)) else ""
        return f"pruned by the search after epoch {s[k.pruned_at_epoch]}{shown}"
    return f"{len(r.metrics)} evaluations written"


def _readable(v: Any) -> str:
    """A searched value to 3 significant digits (0.0513, not 0.05130612337); the CSV's
    full-precision values are in each run's .hydra/config.yaml."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _num(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _error_cell(row: Row) -> str:
    if row.median is not None:
        return _num(row.median)
    statuses = sorted({r.status.value for r in row.runs})
    return "/".join(statuses)


CSV_FIELDS = [
    "configuration",
    "dataset",
    "depth",
    "unit",
    "block",
    "shortcut",
    "batch_size",
    "paper_net",
    "runs",
    "completed",
    "not_completed",
    "seeds",
    "median_error",
    "mean_error",
    "std_error",
    "median_error_ema",
    "recipe",
    "paper_error",
    "top5_error",
    "crop2",
    "crop2_error",
    "crop2_top5_error",
    "params",
    "images_per_s",
    "wall_time_s",
]


def write_csv(rows: list[Row], path: Path) -> None:
    """Full-precision values, one row per configuration (empty where there is none)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in rows:
            c = row.config
            values = {
                "configuration": row.label,
                "dataset": c.get("data.name"),
                "depth": c.get("depth"),
                "unit": row.runs[0].summary.get("unit", c.get("model.unit")),
                "block": c.get("model.block"),
                "shortcut": shortcut_text(c),
                "batch_size": c.get("data.batch_size"),
                "paper_net": paper_net(c),
                "runs": len(row.runs),
                "completed": len(row.completed),
                "not_completed": "; ".join(
                    f"{r.path.name}: {r.status.value}" for r in row.not_completed
                ),
                "seeds": " ".join(str(r.seed) for r in row.runs),
                "median_error": row.median,
                "mean_error": row.mean,
                "std_error": row.std,
                "median_error_ema": row.median_ema,
                "recipe": recipe_text(c),
                "paper_error": row.paper,
                "top5_error": row._median_of("final_test_top5_error"),
                **_second_crop(row),
                "params": row.params,
                "images_per_s": row.images_per_s,
                "wall_time_s": row.wall_time_s,
            }
            w.writerow({k: ("" if v is None else v) for k, v in values.items()})


def _second_crop(row: Row) -> dict[str, Any]:
    crops = row.crop_errors()
    if len(crops) < 2:
        return {}
    crop, top1, top5 = crops[1]
    return {"crop2": crop, "crop2_error": top1, "crop2_top5_error": top5}


def imagenet_table(rows: list[Row]) -> list[str]:
    """Top-1 / top-5 at each test crop beside the paper's Table 5 (320 crop)."""
    rows = [r for r in rows if r.config.get("data.name") == "imagenet" or len(r.crops()) > 1]
    if not rows:
        return []
    crops = sorted({c for r in rows for c in r.crops()}, key=lambda c: (c != rows[0].crops()[0], c))
    lines = [
        "",
        "## Single-crop top-1 / top-5 error % (ImageNet: the val/ images)",
        "",
        "| configuration | "
        + " | ".join(f"{c}x{c} crop" for c in crops)
        + " | paper (Table 5), 320x320 |",
        "|---|" + "---|" * (len(crops) + 1),
    ]
    for row in rows:
        cells = {c: f"{_num(t1)} / {_num(t5)}" for c, t1, t5 in row.crop_errors() if t1 is not None}
        paper = (row.paper or "").replace("/", " / ")
        lines.append(
            f"| {row.label} | " + " | ".join(cells.get(c, "") for c in crops) + f" | {paper} |"
        )
    lines += [
        "",
        "Test crops: the centre crop of the image resized to crop / 0.875 on its shorter "
        "side (256 for 224, 366 for 320; `data.eval_crop_ratio`); medians over seeds.",
        "The paper column is the paper's Table 5 (the authors' Caffe nets); "
        "fb.resnet.torch's re-implementation of pre-act ResNet-200 reports 20.1 / 4.8 "
        "at 320 with its own recipe, which the presets follow (docs/fidelity.md).",
    ]
    return lines


def markdown(rows: list[Row], sources: list[Path], figures: list[Path]) -> str:
    """The training runs' part of report.md (none: a line saying so)."""
    runs = [r for row in rows for r in row.runs]
    done = sum(len(row.completed) for row in rows)
    where = ", ".join(f"`{s}`" for s in sources)
    lines = ["# resnet-exp report", ""]
    if not rows:
        lines.append(f"No training runs in {where}: no error table or training figures.")
        return "\n".join(lines) + "\n"
    lines += [
        f"{len(runs)} runs in {len(rows)} configurations ({done} completed), from {where}.",
        "",
    ]
    scales = {r.config.get("scale.name") for r in runs}
    if "short" in scales:
        c = next(r.config for r in runs if r.config.get("scale.name") == "short")
        lines += [
            f"scale=short: ResNet-{c.get('scale.resnet110')} stands for ResNet-110, "
            f"ResNet-{c.get('scale.resnet164')} for -164, ResNet-{c.get('scale.resnet1001')} "
            "for -1001, trained for a few hundred steps; the paper column gives the "
            "full-size net's error, for comparing the ordering of rows, not the values.",
            "",
        ]
    lines += main_table(rows)
    lines += imagenet_table(rows)
    lines += compare.markdown(compare.against_original(rows))
    lines += not_completed_tables(rows)
    if figures:
        lines += [""] + [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def main_table(rows: list[Row]) -> list[str]:
    """One line per configuration; the weight average's column where a run kept one."""
    ema = any(row.errors_ema for row in rows)
    head = ["configuration", "runs", "test error % (median)", "mean ± std"]
    head += ["EMA weights' test error % (median)"] * ema + ["paper", "params", "images/s"]
    lines = ["| " + " | ".join([*head, "wall time"]) + " |", "|---" * (len(head) + 1) + "|"]
    for row in rows:
        spread = _num(row.mean) + (f" ± {row.std:.2f}" if row.std is not None else "")
        params = f"{row.params / 1e6:.2f}M" if row.params else ""
        cells = [row.label, f"{len(row.completed)}/{len(row.runs)}", _error_cell(row), spread]
        cells += [_num(row.median_ema)] * ema + [row.paper or "", params]
        cells += [_num(row.images_per_s, 0), _duration(row.wall_time_s)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Test error: the final evaluation's error on the test set, over seeds (the paper "
        "reports the median of 5 final errors; no lowest-over-evaluations error is given, "
        "as that would select on the test set); paper: the paper's median of 5 runs "
        "(fail: above 20%); runs: completed/all; images/s and wall time: per run, median.",
    ]
    if ema:
        lines[-1] += (
            " EMA weights: the same evaluation of the exponential moving average of the "
            "weights (trainer.ema), for the runs that kept one."
        )
    if any(recipe_text(row.config) != "paper recipe" for row in rows):
        lines[-1] += (
            " The paper column is the paper's number under the paper's recipe, whatever "
            "recipe the row trained with."
        )
    return lines


def not_completed_tables(rows: list[Row]) -> list[str]:
    """The runs left to continue (time limit), then the ones that failed."""
    lines: list[str] = []
    missing = [(row, r) for row in rows for r in row.not_completed]
    left = [(row, r) for row, r in missing if _resumable(r)]
    if left:
        lines += [
            "",
            "## Runs not finished (continue with resume=auto)",
            "",
            "| run | configuration | status | progress | last evaluation |",
            "|---|---|---|---|---|",
        ]
        for row, r in left:
            lines.append(
                f"| `{r.path.name}` | {row.label} | {_status_text(r)} | {_progress(r)} "
                f"| {_last_evaluation(r)} |"
            )
        lines += ["", "Not in the medians above: they count completed runs only."]
    failed = [(row, r) for row, r in missing if not _resumable(r)]
    if failed:
        lines += ["", "## Runs not completed", "", "| run | configuration | status | detail |"]
        lines.append("|---|---|---|---|")
        for row, r in failed:
            detail = r.summary.get("error") or _stopped_at(r)
            lines.append(f"| `{r.path.name}` | {row.label} | {r.status.value} | {detail} |")
    return lines
