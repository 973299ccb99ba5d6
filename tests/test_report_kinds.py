"""What a report says of runs that are not training runs (mode=diagnose), and of training
runs with nothing to draw: it describes them as they are and draws no empty figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from resnet_exp.report import write_report

from conftest import TINY, run_main

DIAGNOSE = ["mode=diagnose", *TINY]


@pytest.fixture(scope="module")
def diagnose_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("diagnose")
    sweep = tmp / "sweep"
    run_main(["-m", *DIAGNOSE, "block=original,preact", f"hydra.sweep.dir={sweep}"], tmp)
    return sweep


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    run_main([*TINY, "trainer.max_steps=4", f"hydra.run.dir={tmp / 'run'}"], tmp)
    return tmp / "run"


def test_a_diagnose_sweep_reports_its_measurements_not_missing_training(
    diagnose_sweep: Path,
) -> None:
    md = (diagnose_sweep / "report.md").read_text()
    assert "not completed" not in md.lower() and "0 completed" not in md
    assert "No training runs in" in md
    assert "## Gradient flow at initialisation (2 runs of mode=diagnose)" in md
    for job in sorted(diagnose_sweep.glob("*_*_8")):
        s = json.loads((job / "summary.json").read_text())
        row = (
            f"| `{job.name}` | ResNet-8 | {s['block']} | {s['batch_size']} | 0 | completed "
            f"| {s['loss']:.3g} | {s['grad_ratio_first_last']:.3g} "
            f"| {s['forward_growth_last_first']:.3g} |"
        )
        assert row in md
    assert "![gradient flow](gradflow_overlay.png)" in md  # drawn before the report
    assert (diagnose_sweep / "gradflow_overlay.png").is_file()
    for name in ("curves.png", "final_error.png", "report.csv"):  # nothing trained to draw
        assert not (diagnose_sweep / name).exists(), name


def test_training_and_diagnose_runs_in_one_report(
    diagnose_sweep: Path, trained: Path, tmp_path: Path
) -> None:
    """Each kind in its part; the diagnose runs link their own figures (no sweep overlay
    among the given directories)."""
    job = next(diagnose_sweep.glob("0_*"))
    written = write_report([trained, job], tmp_path / "out")
    assert [p.name for p in written] == ["report.md", "report.csv", "curves.png", "final_error.png"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1 runs in 1 configurations (1 completed)" in md
    assert "## Gradient flow at initialisation (1 runs of mode=diagnose)" in md
    link = md.split("![gradient flow](")[1].split(")")[0]
    assert (tmp_path / "out" / link).resolve() == (job / "gradflow.png").resolve()
    csv_text = (tmp_path / "out" / "report.csv").read_text()
    assert len(csv_text.strip().splitlines()) == 2  # the header and the trained run only


def test_no_empty_figures_for_runs_that_never_logged(trained: Path, tmp_path: Path) -> None:
    """A run that failed before its first step has no point to draw: no curves.png, no
    final_error.png; its row and its error are in report.md."""
    failed = shutil.copytree(trained, tmp_path / "failed")
    for f in failed.iterdir():
        if f.name.startswith("events.") or f.name == "metrics.jsonl":
            f.unlink()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "bad value"}))
    written = write_report([failed], tmp_path / "out")
    assert [p.name for p in written] == ["report.md", "report.csv"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| `failed` |" in md and "bad value" in md and "![" not in md
