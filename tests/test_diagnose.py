"""`resnet-exp mode=diagnose`: a run's CSV, PNG, TensorBoard and summary, and the sweep overlay."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_exp.callbacks import SweepOverlay
from resnet_exp.modes.diagnose import FIELDS

from conftest import run_main


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0.05  # drawn on, not blank


def test_diagnose_sweep_writes_each_run_and_an_overlay(
    tmp_path: Path, data_args: list[str]
) -> None:
    sweep = tmp_path / "sweep"
    proc = run_main(
        [
            "-m",
            "mode=diagnose",
            "block=original,preact",
            "depth=20",
            "diagnose.batch_size=16,1",  # batch 1 fails (BN needs 2): recorded, sweep goes on
            *data_args,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1  # the sweep ran every job, then reports the failed ones
    assert "diagnose.batch_size=1 must be at least 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    jobs = {}
    for summary_path in sorted(sweep.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if summary["status"] == "failed":
            assert not (summary_path.parent / "gradflow.csv").exists()
            continue
        jobs[summary["block"]] = (summary_path.parent, summary)
    assert sorted(jobs) == ["original", "preact"]

    for block, (run, summary) in jobs.items():
        assert summary["mode"] == "diagnose" and summary["batch_size"] == 16
        rows = read_rows(run / "gradflow.csv")
        assert list(rows[0]) == FIELDS
        assert [int(r["index"]) for r in rows] == list(range(10))  # x_0 .. x_9 of ResNet-20
        assert rows[-1]["signal"] == "unit 8 output"
        grad = [float(r["grad_norm"]) for r in rows]
        std = [float(r["std"]) for r in rows]
        assert all(math.isfinite(v) and v > 0 for v in grad + std)
        assert summary["grad_ratio_first_last"] == pytest.approx(grad[0] / grad[-1], rel=1e-6)
        assert summary["forward_growth_last_first"] == pytest.approx(std[-1] / std[0], rel=1e-6)
        line = (
            f"{block} ResNet-20: gradient norm first/last unit "
            f"{summary['grad_ratio_first_last']:.3g}, forward std growth last/first "
            f"{summary['forward_growth_last_first']:.3g}"
        )
        assert line in proc.stderr + proc.stdout
        assert line in (run / "resnet-exp.log").read_text()
        assert_png(run / "gradflow.png")

        acc = EventAccumulator(str(run))
        acc.Reload()
        events = acc.Scalars("diagnose/grad_norm_vs_signal")
        assert [e.step for e in events] == list(range(10))
        assert [e.value for e in events] == pytest.approx(grad, rel=1e-6)
        assert [e.value for e in acc.Scalars("diagnose/std_vs_signal")] == pytest.approx(std)
        assert "diagnose/figure" in acc.Tags()["images"]

    assert_png(sweep / "gradflow_overlay.png")
    overlay = read_rows(sweep / "gradflow_overlay.csv")
    assert sorted({r["block"] for r in overlay}) == ["original", "preact"]
    for block, (run, _) in jobs.items():
        own = [r["grad_norm"] for r in read_rows(run / "gradflow.csv")]
        assert [r["grad_norm"] for r in overlay if r["block"] == block] == own


def test_overlay_skips_sweeps_without_diagnose_runs(tmp_path: Path) -> None:
    """The sweep callback draws only diagnose runs: a training sweep is left as it was."""
    job = tmp_path / "0_preact_20"
    job.mkdir()
    (job / "summary.json").write_text(json.dumps({"status": "completed", "block": "preact"}))
    SweepOverlay().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0_preact_20"]


def test_diagnose_dry_run(tmp_path: Path) -> None:
    args = ["mode=diagnose", "dataset=synthetic", "depth=164", "dry_run=true"]
    proc = run_main(args, cwd=tmp_path)
    info = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert info["mode"] == "diagnose" and info["params"] == 1_703_258 and info["batch_size"] == 32
    assert not list(tmp_path.rglob("gradflow.csv"))
