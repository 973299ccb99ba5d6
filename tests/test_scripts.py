"""The measuring scripts whose figures README.md and docs/ quote, each run in a tiny mode
(`make test-slow`): they run to the end and report what they measured."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ONE_THREAD, REPO


def script(name: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **ONE_THREAD},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_benchmark_packing_measures_one_run_and_a_pack(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    stdout = script(
        "benchmark_packing.py", "--model", "original:8", "--pack", "1", "--pack", "2x1",
        "--batch", "16", "--steps", "2", "--warmup", "1", "--repeats", "1",
        "--synthetic-images", "128", "--device", "cpu", "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    rows = json.loads((out / "packing.json").read_text())["rows"]
    assert [r["runs"] for r in rows] == [1, 2] and all("error" not in r for r in rows), rows
    assert all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0
    table = [ln for ln in (out / "packing.md").read_text().splitlines() if ln.startswith("|")]
    assert "vs alone" in table[0] and len(table) == 2 + 2  # header, rule, one row a pack
    assert "written:" in stdout


@pytest.mark.slow
def test_data_throughput_makes_a_folder_and_times_the_stream(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    stdout = script(
        "data_throughput.py", "--root", str(root), "--train-images", "16", "--val-images", "8",
        "--classes", "2", "--batch", "4", "--batches", "2", "--workers", "1", "--device", "cpu",
        "--eval", "--stages",
        cwd=tmp_path,
    )  # fmt: skip
    assert len(list((root / "train").rglob("*.JPEG"))) == 16
    for pattern in (
        r"train: \d+ images/s \(\(4, 3, 224, 224\) torch\.float32\)",
        r"eval \(224 \+ 320 crops\): \d+ images/s",
        r"ms per image, one thread: read [\d.]+, decode [\d.]+, crop\+resize [\d.]+",
    ):
        assert re.search(pattern, stdout), (pattern, stdout)


@pytest.mark.slow
def test_fidelity_cost_times_every_option(tmp_path: Path) -> None:
    stdout = script(
        "fidelity_cost.py", "--depth", "8", "--batch", "8", "--steps", "1", "--rounds", "1",
        cwd=tmp_path,
    )  # fmt: skip
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d,]+) \|$", stdout, re.M)
    assert [r[0] for r in rows] == [
        "fp32, whole-batch BN",
        "fp32, model.bn_group=4",
        "bf16, fp32_identity=true",
        "bf16, fp32_identity=false",
        "loader, pad_value=mean",
        "loader, pad_value=zero",
    ]
    assert all(float(ms) > 0 for _, ms, _ in rows)


@pytest.mark.parametrize(
    "name", ["benchmark.py", "benchmark_packing.py", "data_throughput.py", "fidelity_cost.py"]
)
def test_script_imports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the quick suite: each script loads (its imports from the package and from
    its neighbour scripts resolve), without running."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(f"script_{name[:-3]}", REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    assert callable(module.main)
