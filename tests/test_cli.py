"""End to end: a run through the installed `resnet-exp` console script, in a subprocess;
its continuation, a sweep and the dry run through the command's entry function, in
this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resnet_exp.run.records import read_metrics

from conftest import cifar10_root, read_summary, run_cli, run_installed, run_main, tb_scalars

SMALL = [
    "depth=20",
    "data.image_size=16",  # a quarter of the compute; the same net, steps and files
    "trainer.progress=false",
    "data.batch_size=64",
    "trainer.log_every=4",
]


def run_dirs(root: Path) -> list[Path]:
    return sorted(
        p.parent.parent for p in root.rglob(".hydra/config.yaml") if "resumed" not in str(p)
    )


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return {tag: sorted(points.items()) for tag, points in tb_scalars(run_dir).items()}


def test_train_writes_run_directory_and_resumes(tmp_path: Path, data_args: list[str]) -> None:
    run = tmp_path / "run"
    run_cli([*SMALL, *data_args, "trainer.max_steps=12", f"hydra.run.dir={run}"], cwd=tmp_path)
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["steps_done"] == 12
    assert summary["params"] == 269_722 and summary["block"] == "preact"
    assert 0 <= summary["final_test_error"] <= 100 and summary["train_images_per_s"] > 0
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[-1]["step"] == 12 and "test_error" in rows[-1] and "train_loss" in rows[-1]
    tags = scalars(run)
    for tag in (
        "train/loss",
        "train/error",
        "test/loss",
        "test/error",
        "lr",
        "throughput/images_per_s",
    ):
        assert tag in tags, tag
    assert [s for s, _ in tags["train/loss"]] == [4, 8, 12]
    assert (run / "last.pt").exists() and (run / ".hydra" / "config.yaml").exists()

    # Continue the same run to 20 steps: resume=PATH continues in that directory.
    run_main([*SMALL, *data_args, "trainer.max_steps=20", f"resume={run}"], cwd=tmp_path)
    summary = read_summary(run)
    assert summary["steps_done"] == 20
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [12, 16, 20]  # 16 steps per epoch: epoch 1 ends at 16
    assert [s for s, _ in scalars(run)["train/loss"]] == [4, 8, 12, 16, 20]
    assert (run / ".hydra" / "config.yaml").read_text().count("resume: null") == 1  # original kept


def test_multirun_two_blocks_two_directories(tmp_path: Path, data_args: list[str]) -> None:
    sweep = tmp_path / "sweep"
    run_main(
        [
            "-m",
            "block=original,preact",
            *SMALL,
            *data_args,
            "trainer.max_steps=4",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    dirs = run_dirs(sweep)
    assert [d.name for d in dirs] == ["0_original_20", "1_preact_20"]
    blocks = [read_summary(d)["block"] for d in dirs]
    assert blocks == ["original", "preact"]


def test_dry_run_prints_summary_from_any_directory(tmp_path: Path) -> None:
    proc = run_main(
        ["dataset=synthetic", "depth=1001", "dry_run=true", "trainer.device=cpu"], cwd=tmp_path
    )
    info = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert info["params"] == 10_327_706 and info["unit"] == "bottleneck"
    assert not list(tmp_path.rglob("last.pt"))


@pytest.mark.slow
def test_wheel_install_finds_its_configs(installed_wheel: Path, tmp_path: Path) -> None:
    """A regular (non-editable) install carries the configs inside the package."""
    site = installed_wheel
    assert (site / "resnet_exp" / "configs" / "config.yaml").exists()
    code = (
        "import sys; from resnet_exp import cli; print('CONFIGS', cli.config_dir()); sys.argv[1:] = "
        "['dataset=synthetic', 'block=original', 'depth=32', 'dry_run=true']; cli.main()"
    )
    proc = run_installed(site, code, cwd=tmp_path)  # a directory without configs
    assert f"CONFIGS {site / 'resnet_exp' / 'configs'}" in proc.stdout
    assert '"params": 464154' in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(cifar10_root() is None, reason="no CIFAR-10 copy on this machine")
def test_resnet20_learns_on_real_cifar10(tmp_path: Path, cache_dir: Path) -> None:
    """150 steps of ResNet-20 (batch 128, lr 0.1 without the warm-up, as the paper trains
    its nets but ResNet-110) reach well above 10% chance accuracy.

    Measured (bf16 CPU): 61.5% and 60.6% test error for seeds 0 and 1 (with the warm-up,
    lr 0.01 throughout, 150 steps leave 73%); the bar (70%) leaves room for seeds.
    """
    run = tmp_path / "run"
    run_main(
        [
            "depth=20",
            "block=preact",
            f"data.root={cifar10_root()}",
            f"data.cache_dir={cache_dir}",
            "data.test_limit=2000",
            "trainer.max_steps=150",
            "schedule.warmup=false",
            "trainer.progress=false",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
    )  # a minute or two: decoding 60k JPEGs (once a session), then 150 steps on one thread
    summary = read_summary(run)
    assert summary["final_test_error"] < 70.0, summary
