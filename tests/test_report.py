"""Sweep reports: a real multirun (two variants x two seeds, plus a failing variant) on CPU."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_exp.report import cli as report_cli
from resnet_exp.report import figures
from resnet_exp.report.paper import paper_error
from resnet_exp.report.runs import Run
from resnet_exp.report.tables import group_rows
from resnet_exp.run.records import RunRecords, read_metrics

from conftest import read_summary, run_main

# A ResNet-8 sweep on the shared small data set (conftest's data_args).
SWEEP_JOB = [
    "depth=8",
    "data.image_size=16",  # a quarter of the compute; the report reads the same files
    "block=original",
    "data.batch_size=64",
    "trainer.max_steps=10",
    "trainer.log_every=2",
    "trainer.progress=false",
]
LABELS = ["identity", "exclusive_gating(b_g=-6)", "dropout(p=1.5)"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_args: list[str]) -> Path:
    """identity and exclusive gating train; the dropout jobs fail (p=1.5 is refused)."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = tmp / "multirun"
    proc = run_main(
        [
            "-m",
            "shortcut=identity,exclusive_gating,dropout",
            "seed=1,2",
            "model.shortcut.dropout=1.5",
            *SWEEP_JOB,
            *data_args,
            # 384 training images at batch 64: 6 steps per epoch, so 10 steps give two
            # evaluations (steps 6 and 10).
            "data.train_limit=384",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp,
        check=False,
    )
    assert proc.returncode == 1 and "2 of 6 jobs failed" in proc.stderr  # the dropout jobs
    assert f"report in {sweep / 'report.md'}" in proc.stdout  # the callback announced it
    return sweep


def runs_by_label(sweep: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for d in sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir()):
        name = OmegaConf.load(d / ".hydra" / "config.yaml").model.shortcut.name
        out.setdefault(name, []).append(d)
    return out


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["configuration"]: row for row in csv.DictReader(f)}


def test_multirun_report_holds_the_runs_values(sweep: Path) -> None:
    # Written by the Hydra callback at the end of the multirun, not by the command.
    for name in ("report.md", "report.csv", "curves.png", "final_error.png"):
        assert (sweep / name).is_file(), name
    rows = read_csv(sweep / "report.csv")
    assert list(rows) == LABELS
    dirs = runs_by_label(sweep)
    for label, name in zip(LABELS[:2], ("identity", "exclusive_gating")):
        row = rows[label]
        summaries = [read_summary(d) for d in dirs[name]]
        metrics = [read_metrics(d / "metrics.jsonl") for d in dirs[name]]
        assert [s["status"] for s in summaries] == ["completed", "completed"]
        assert [s["seed"] for s in summaries] == [1, 2]
        final = [m[-1]["test_error"] for m in metrics]  # the last evaluation of each seed
        assert final == [s["final_test_error"] for s in summaries]
        assert len(metrics[0]) == 2 and metrics[0][-1]["step"] == 10
        assert float(row["median_error"]) == statistics.median(final)
        assert float(row["mean_error"]) == statistics.fmean(final)
        assert float(row["std_error"]) == statistics.stdev(final)
        # No minimum over test evaluations: that would select on the test set.
        assert not any("best" in k for k in row)
        assert int(row["params"]) == summaries[0]["params"]
        assert float(row["images_per_s"]) == statistics.median(
            s["train_images_per_s"] for s in summaries
        )
        assert float(row["wall_time_s"]) == statistics.median(s["wall_time_s"] for s in summaries)
        assert (row["runs"], row["completed"], row["seeds"]) == ("2", "2", "1 2")
        assert summaries[0]["shortcut"] == label
        md = (sweep / "report.md").read_text()
        assert f"| {label} | 2/2 | {statistics.median(final):.2f} |" in md
        assert "| test error % (median) | mean ± std | paper |" in md  # no "best" column
    # The gates add parameters: 1x1 convs from each unit's input to its output.
    assert int(rows[LABELS[1]]["params"]) > int(rows[LABELS[0]]["params"])


def test_failed_runs_are_listed(sweep: Path) -> None:
    row = read_csv(sweep / "report.csv")["dropout(p=1.5)"]
    assert (row["runs"], row["completed"], row["median_error"]) == ("2", "0", "")
    assert row["not_completed"] == "4_original_8: failed; 5_original_8: failed"
    md = (sweep / "report.md").read_text()
    assert "| dropout(p=1.5) | 0/2 | failed |" in md
    listed = md.split("## Runs not completed")[1]
    assert listed.count("| failed | model.shortcut.dropout=1.5 must be in [0, 1) |") == 2


def test_figures_open(sweep: Path) -> None:
    for name in ("curves.png", "final_error.png"):
        with Image.open(sweep / name) as im:
            im.verify()
        with Image.open(sweep / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 150
            # Not blank: the axes' greys and the data in colour (lines, markers, bars).
            rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
        saturation = rgb.max(axis=2) - rgb.min(axis=2)
        assert (rgb.min(axis=2) < 100).sum() > 500, name  # dark pixels: axes, ticks, text
        assert (saturation > 80).sum() > 200, name  # coloured pixels: the plotted data


def test_report_command_on_run_directories(sweep: Path, tmp_path: Path, capsys) -> None:
    """Several run directories give the same table as their multirun directory."""
    dirs = runs_by_label(sweep)["identity"] + runs_by_label(sweep)["exclusive_gating"]
    report_cli.main([*map(str, dirs), "-o", str(tmp_path)])
    assert str(tmp_path / "report.md") in capsys.readouterr().out
    mine, theirs = read_csv(tmp_path / "report.csv"), read_csv(sweep / "report.csv")
    assert list(mine) == LABELS[:2]
    for label in LABELS[:2]:
        assert mine[label] == theirs[label]


def test_report_command_errors_are_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        report_cli.main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"resnet-exp-report: error: no runs in {tmp_path}: a run directory holds .hydra/config.yaml\n"
    )
    assert not (tmp_path / "report.md").exists()


def test_each_run_logs_hparams_in_its_own_directory(sweep: Path) -> None:
    run = runs_by_label(sweep)["exclusive_gating"][0]
    assert not [p for p in run.rglob("events.out.tfevents.*") if p.parent != run]  # no sub-runs
    acc = EventAccumulator(str(run))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    start = content["_hparams_/session_start_info"]
    assert b"exclusive_gating" in start and b"model.shortcut.gate_bias" in start
    summary = read_summary(run)
    final = acc.Scalars("hparams/final_test_error")
    assert [(e.step, round(e.value, 4)) for e in final] == [
        (10, round(summary["final_test_error"], 4))
    ]


@pytest.mark.parametrize("split", ["test", "val"])
def test_hparams_metrics_are_final_errors_only(tmp_path: Path, split: str) -> None:
    """No lowest-over-evaluations error (selected on the split it reports) in HPARAMS."""
    summary = {
        "status": "completed",
        "steps_done": 7,
        f"final_{split}_error": 40.0,
        f"best_{split}_error": 35.0,
        f"final_{split}_loss": 1.5,
        "final_train_loss": 1.2,
        "final_train_error": 30.0,
    }
    if split == "val":
        summary["test_error"] = 41.0
    with RunRecords(tmp_path) as records:
        records.summary(summary, {"depth": 20, "seed": 0})
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    shown = {t for t in acc.Tags()["scalars"] if t.startswith("hparams/")}
    expect = {f"hparams/final_{split}_error", "hparams/final_train_error"}
    assert shown == expect | ({"hparams/test_error"} if split == "val" else set())
    experiment = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    assert b"best_" not in experiment and b"final_train_loss" not in experiment


def test_paper_numbers_are_keyed_by_the_net_a_run_stands_for() -> None:
    base = {"data.name": "cifar10", "data.batch_size": 128, "model.unit": "auto"}
    full = {"scale.resnet110": 110, "scale.resnet164": 164, "scale.resnet1001": 1001}
    short = {"scale.resnet110": 20, "scale.resnet164": 29, "scale.resnet1001": 47}
    cases = [
        ({**full, "depth": 110, "model.block": "bn_after_add"}, "8.17"),
        ({**short, "depth": 29, "model.block": "preact"}, "5.46"),  # stands for ResNet-164
        ({**full, "depth": 20, "model.block": "preact"}, None),  # not a net of the paper
        ({**short, "depth": 20, "model.block": "original", "model.unit": "single"}, "9.90"),
        (
            {**full, "depth": 110, "model.block": "original", "model.shortcut.name": "exclusive_gating",
             "model.shortcut.gate_bias": -7.0},
            "9.81",
        ),
        ({**full, "depth": 1001, "model.block": "preact", "data.batch_size": 64}, "4.62 (mean 4.69 ± 0.20)"),
        ({**full, "depth": 164, "model.block": "original", "data.name": "cifar100"}, "25.16"),
    ]  # fmt: skip
    for config, expect in cases:
        assert paper_error({**base, **config}) == expect, config


def test_unfinished_runs_are_listed_with_their_progress_apart_from_failures(
    sweep: Path, tmp_path: Path
) -> None:
    """Of two seeds of one configuration, one stopped at its time limit after its first
    evaluation: it is listed with its progress and last evaluation, out of the median."""
    import shutil

    from resnet_exp.report import write_report

    done, cut = (shutil.copytree(d, tmp_path / d.name) for d in runs_by_label(sweep)["identity"])
    shutil.copytree(runs_by_label(sweep)["dropout"][0], tmp_path / "failed")
    summary = read_summary(cut)
    for key in ("final_test_error", "final_test_loss", "wall_time_s"):
        summary.pop(key)
    summary.update(status="interrupted", reason="time_limit", steps_done=6)
    (cut / "summary.json").write_text(json.dumps(summary))
    first = (cut / "metrics.jsonl").read_text().splitlines()[0]
    (cut / "metrics.jsonl").write_text(first + "\n")

    write_report([tmp_path], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    done_error = read_summary(done)["final_test_error"]
    row = read_csv(tmp_path / "out" / "report.csv")["identity"]
    assert (row["runs"], row["completed"]) == ("2", "1")
    assert float(row["median_error"]) == pytest.approx(done_error)  # the stopped one is out
    unfinished = md.split("## Runs not finished")[1].split("## Runs not completed")[0]
    first_error = json.loads(first)["test_error"]
    assert (
        f"| `{cut.name}` | identity | interrupted (time limit) | step 6 of 10 (60%) "
        f"| test error {first_error:.2f}% at step 6 (epoch 1) |"
    ) in unfinished
    assert "failed" not in unfinished
    assert "| `failed` | dropout(p=1.5) | failed |" in md.split("## Runs not completed")[1]


def test_each_ordering_against_the_original_with_a_bootstrap_interval() -> None:
    from resnet_exp.report.compare import against_original, markdown, median_difference_interval
    from resnet_exp.report.runs import Run
    from resnet_exp.report.tables import group_rows

    low, high = median_difference_interval([7.0, 7.2, 7.1], [6.0, 6.2, 6.1])
    assert -1.21 < low <= high < -0.79  # every resample: preact lower by about a point
    low, high = median_difference_interval([7.0, 6.0, 8.0], [7.5, 6.5, 6.8])
    assert low < 0 < high

    def run(block: str, seed: int, error: float) -> Run:
        config = {"model.block": block, "depth": 20, "data.name": "cifar10", "seed": seed}
        summary = {"status": "completed", "final_test_error": error}
        return Run(Path(f"{block}{seed}"), config, summary, [])

    runs = [run("original", s, e) for s, e in ((1, 7.0), (2, 7.2), (3, 7.1))]
    runs += [run("preact", s, e) for s, e in ((1, 6.0), (2, 6.2), (3, 6.1))]
    runs += [run("bn_after_add", s, e) for s, e in ((1, 7.4), (2, 6.8))]
    (preact, bn) = against_original(group_rows(runs))
    assert preact.row.label == "preact" and preact.difference == pytest.approx(-1.0)
    assert preact.resolved and not bn.resolved
    md = "\n".join(markdown([preact, bn]))
    assert "| preact | 3 (3) | -1.00 | [-1.20, -0.80] | yes |" in md
    assert "| bn_after_add | 2 (3) |" in md and bn.difference == pytest.approx(0.0)


# --- figures: what they draw, read back from the figure and from the PNG -------------


def curve_runs(steps: int, log_every: int, evals: int) -> list[Run]:
    """Two configurations' runs as the loader would read them: a training loss every
    ``log_every`` steps (or once, at the end, for a run shorter than that), valued as
    a 64k-step run's at those steps."""
    runs = []
    for i, (block, floor) in enumerate((("preact", 0.02), ("original", 0.05))):
        logged = list(range(log_every, steps + 1, log_every)) or [steps]
        loss = [(s, floor + 2.3 * math.exp(-6 * s / 64_000) * (1 - 0.02 * i)) for s in logged]
        errors = [
            (steps * (k + 1) // evals, (90.0 - 5 * i) * math.exp(-2 * (k + 1) / evals))
            for k in range(evals)
        ]
        config = {"data.name": "cifar10", "depth": 110, "model.block": block, "seed": 1}
        config |= {"model.unit": "auto", "data.batch_size": 128}
        summary = {"status": "completed", "final_test_error": errors[-1][1]}
        metrics = [{"step": s, "test_error": e} for s, e in errors]
        runs.append(Run(Path(f"run{i}"), config, summary, metrics, loss))
    return runs


def loss_labels(fig, ax) -> list[str]:
    """The training-loss axis's tick labels inside its view, as drawn."""
    FigureCanvasAgg(fig).draw()
    lo, hi = ax.get_ylim()
    ticks = ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
    return [
        t.label1.get_text()
        for t in ticks
        if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi
    ]


def coloured_pixels(png: Path, rgb: tuple[int, int, int], left: bool) -> int:
    with Image.open(png) as im:
        px = im.convert("RGB")
        w, h = px.size
        box = (0, 0, w // 2, h) if left else (w // 2, 0, w, h)
        panel = np.asarray(px.crop(box), dtype=np.int16).reshape(-1, 3)
    # antialiased and translucent lines blend with the white: a wide tolerance
    return int((np.abs(panel - np.array(rgb, dtype=np.int16)) < 45).all(axis=1).sum())


def test_short_run_curves_draw_single_points_with_distinct_labels(tmp_path: Path) -> None:
    """30 steps, log_every 50: one loss point per run, drawn as a marker on a linear axis."""
    rows = group_rows(curve_runs(30, 50, 2))
    fig = figures.curves_figure(rows)
    ax_loss = fig.axes[0]
    assert [len(line.get_xdata()) for line in ax_loss.lines] == [1, 1]
    assert all(line.get_marker() not in (None, "None", "") for line in ax_loss.lines)
    labels = loss_labels(fig, ax_loss)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels
    png = figures.curves(rows, tmp_path / "curves.png")
    for colour in ((31, 119, 180), (255, 127, 14)):  # tab:blue, tab:orange: each run's marker
        assert coloured_pixels(png, colour, left=True) > 10


def test_full_run_curves_are_log_scaled_with_distinct_labels(tmp_path: Path) -> None:
    """A full run's length: 64k steps, a loss point every 50, 164 evaluations."""
    rows = group_rows(curve_runs(64_000, 50, 164))
    fig = figures.curves_figure(rows)
    ax_loss, ax_err = fig.axes[0], fig.axes[1]
    assert ax_loss.get_yscale() == "log"
    assert [len(line.get_xdata()) for line in ax_loss.lines] == [1280, 1280]
    assert [len(line.get_xdata()) for line in ax_err.lines] == [164, 164]
    labels = loss_labels(fig, ax_loss)
    assert {"0.1", "1"} <= set(labels) and len(set(labels)) == len(labels), labels
    png = figures.curves(rows, tmp_path / "curves.png")
    for colour in ((31, 119, 180), (255, 127, 14)):  # each run's line, not a dot
        assert coloured_pixels(png, colour, left=True) > 100
        assert coloured_pixels(png, colour, left=False) > 100


def test_signal_figure_draws_the_median_first_unit_ratio_per_ordering(tmp_path: Path) -> None:
    """Two orderings x three seeds of tracked runs (one seed measured at fewer steps):
    one line per ordering through the median over seeds at each step."""

    def run(block: str, seed: int, curve: list[tuple[int, float]]) -> Run:
        config = {"data.name": "cifar10", "depth": 110, "model.block": block, "seed": seed}
        summary = {"status": "completed", "final_test_error": 7.0}
        return Run(Path(f"{block}{seed}"), config, summary, [], first_grad_ratio=curve)

    runs = [
        run("original", 1, [(0, 3.0), (100, 2.0), (200, 1.5)]),
        run("original", 2, [(0, 5.0), (100, 4.0), (200, 0.5)]),
        run("original", 3, [(0, 4.0), (100, 9.0)]),  # stopped before step 200
        run("preact", 1, [(0, 1.0), (100, 1.1), (200, 1.2)]),
        run("preact", 2, [(0, 1.4), (100, 1.3), (200, 1.0)]),
        run("preact", 3, [(0, 1.2), (100, 1.2), (200, 1.1)]),
    ]
    rows = group_rows(runs)
    fig = figures.signal_figure(rows)
    ax = fig.axes[0]
    lines = [line for line in ax.lines if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["original (3 seeds)", "preact (3 seeds)"]
    assert list(lines[0].get_xdata()) == [0, 100, 200]
    assert list(lines[0].get_ydata()) == [4.0, 4.0, 1.0]  # the 200 median: two seeds
    assert list(lines[1].get_ydata()) == pytest.approx([1.2, 1.2, 1.1])
    png = figures.signal(rows, tmp_path / "signal.png")
    for colour in ((31, 119, 180), (255, 127, 14)):  # tab:blue, tab:orange
        assert coloured_pixels(png, colour, left=True) > 50
