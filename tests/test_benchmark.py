"""scripts/benchmark.py: Hydra overrides in, the trainer's own step timed, a table and JSON out."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_exp.run.runtime import pick_precision
from resnet_exp.train.loop import Trainer

from conftest import ONE_THREAD, REPO

TINY_BENCH = ["depth=8", "data.image_size=16", "data.batch_size=16", "trainer.device=cpu"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_project_worker_times_the_trainers_step(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark()
    calls = []
    real = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: calls.append(1) or real(self))
    args = argparse.Namespace(
        overrides=[*bench.BASE, *TINY_BENCH, "trainer.channels_last=false"],
        steps=2,
        warmup=1,
        repeats=2,
    )
    result = bench.project_worker(args)
    assert len(calls) == 1 + 2 * 2  # warm-up, then the timed windows
    assert len(result["windows_s"]) == 2 and all(w > 0 for w in result["windows_s"])
    assert result["batch"] == 16 and result["channels_last"] is False
    # what trainer.precision=auto picks on this CPU: bf16 where it has native bf16 units
    assert result["precision"] == pick_precision("auto", torch.device("cpu"))
    assert result["cuda_graphs"] is False


def test_tracking_variant_times_the_signals_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    """--variant trainer.track_signal_every=N: the measurements fall inside the timed windows."""
    from resnet_exp.train.signal import SignalTracker

    bench = load_benchmark()
    measured = []
    real = SignalTracker.record
    monkeypatch.setattr(
        SignalTracker,
        "record",
        lambda self, step, rec: measured.append(step) or real(self, step, rec),
    )
    overrides = [*bench.BASE, *TINY_BENCH, "trainer.track_signal_every=2", "diagnose.batch_size=4"]
    args = argparse.Namespace(overrides=overrides, steps=2, warmup=1, repeats=2)
    result = bench.project_worker(args)
    assert measured == [2, 4]  # steps 2-5 are timed
    assert 0 < result["tracking_share"] < 1
    assert "trainer.track_signal_every=100" in bench.PRESETS["signal"]["variants"]


@pytest.mark.slow
def test_benchmark_command_writes_table_and_json(tmp_path: Path) -> None:
    """Both loops in their subprocesses, as `make bench` runs them."""
    out = tmp_path / "bench"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), *TINY_BENCH]
    cmd += ["--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "0"]
    cmd += ["--variant", "default", "--variant", "trainer.channels_last=false", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **ONE_THREAD})
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["reference", "default", "trainer.channels_last=false"]
    assert all("error" not in r and r["images_per_s"] > 0 for r in rows), rows
    assert "| reference |" in (out / "benchmark.md").read_text()
