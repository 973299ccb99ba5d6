"""The recipe switches beyond the paper in every way a run is run: stopped and resumed
(bit-exact on the CPU), cut by a time limit, packed, searched, data-parallel (torchrun,
slow), and the modern preset end to end (slow)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from resnet_exp.run.stop import Interrupted, StopRequest
from resnet_exp.train.loop import train

from conftest import (
    ONE_THREAD,
    TINY,
    assert_same_tensors,
    compose_config,
    outcome,
    read_checkpoint,
    run_cli,
    run_main,
    stop_at_poll,
)

# 16 steps an epoch, two epochs: an evaluation and a checkpoint on the way.
JOB = [*TINY, "trainer.log_every=5", "trainer.deterministic=true", "trainer.epochs=2"]
SWITCHES = {
    "label_smoothing": ["trainer.label_smoothing=0.1"],
    "ema": ["trainer.ema.decay=0.9", "trainer.ema.warmup_steps=3"],
    "cutout": ["data.cutout=6"],
    "mixup": ["data.mixup_alpha=0.4"],
    "cutmix": ["data.cutmix_alpha=1.0"],
    "mixup_or_cutmix": ["data.mixup_alpha=0.4", "data.cutmix_alpha=1.0"],
}
ALL = [o for switch in SWITCHES.values() for o in switch]


def train_in(run: Path, overrides: list[str], stop: StopRequest | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    train(compose_config(overrides), run, stop)


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_stop_mid_epoch_then_resume_is_bit_identical(switch: str, tmp_path: Path) -> None:
    """Stopped at step 21 (mid-epoch, mid logging interval) and resumed: the weights,
    the average, the optimizer, the loader and its generators, the metrics, curves and
    summary of the run made at once."""
    job = [*JOB, *SWITCHES[switch]]
    whole = tmp_path / "whole"
    train_in(whole, job)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as info:
        train_in(run, job, stop=stop_at_poll(21))
    assert info.value.step == 21
    train_in(run, [*job, f"resume={run}"])
    got, want = outcome(run), outcome(whole)
    assert ("ema" in want["state"]) == (switch == "ema")
    assert ("batch_aug_gen" in want["state"]["loader"]) == (
        switch not in ("label_smoothing", "ema")
    )
    assert_same_tensors(got, want, switch)


def test_a_resume_may_not_change_the_recipe(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_in(run, [*JOB, "trainer.max_steps=5"])
    proc = run_main(
        [*JOB, "trainer.ema.decay=0.9", f"resume={run}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "trainer.ema.decay=None, this run asks for trainer.ema.decay=0.9" in proc.stderr


class Ticks:
    """A clock that advances one 'second' per reading: the time limit falls on the same
    steps in every run, whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = -1.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_time_limit_windows_with_every_switch_end_as_one_run(tmp_path: Path) -> None:
    job = [*JOB, "trainer.epochs=4", *ALL]
    whole = tmp_path / "whole"
    train_in(whole, job)
    run = tmp_path / "windows"
    cfg = compose_config([*job, "trainer.time_limit=50s", "resume=auto"])
    run.mkdir()
    cuts = []
    while True:
        try:
            train(cfg, run, StopRequest(clock=Ticks()))
            break
        except Interrupted as stop:
            assert stop.reason == "time_limit"
            cuts.append(stop.step)
            assert len(cuts) < 6, cuts
    assert cuts and all(0 < c < 64 for c in cuts)
    assert_same_tensors(outcome(run), outcome(whole))


def test_packed_runs_with_every_switch_are_the_runs_alone(tmp_path: Path) -> None:
    job = [*JOB, "trainer.max_steps=20", *ALL]
    sweep = tmp_path / "packed"
    run_cli(
        ["-m", *job, "block=original,preact", "hydra/launcher=packed",
         "hydra.launcher.threads_per_run=1", "hydra.launcher.runs_per_device=2",
         f"hydra.sweep.dir={sweep}"],
        tmp_path,
        env=ONE_THREAD,
    )  # fmt: skip
    for name, block in (("0_original_8", "original"), ("1_preact_8", "preact")):
        alone = tmp_path / name
        train_in(alone, [*job, f"block={block}"])
        assert_same_tensors(outcome(sweep / name), outcome(alone), name)


def test_a_search_over_label_smoothing_composes_and_runs(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="pip install '.[optuna]'")
    sweep = tmp_path / "search"
    job = [*TINY, "data.synthetic_train=128", "trainer.max_steps=4", "data.val_size=32"]
    run_main(
        ["-m", "hydra/sweeper=search", "hydra.sweeper.n_trials=2",
         "trainer.label_smoothing=interval(0,0.2)", *job, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    values = []
    for trial in ("0_preact_8", "1_preact_8"):
        cfg = OmegaConf.load(sweep / trial / ".hydra" / "config.yaml")
        values.append(cfg.trainer.label_smoothing)
        summary = json.loads((sweep / trial / "summary.json").read_text())
        assert summary["status"] == "completed"
    assert all(0 <= v <= 0.2 for v in values) and values[0] != values[1]
    with open(sweep / "report.csv") as f:
        labels = [r["configuration"] for r in csv.DictReader(f)]
    # The search space is the config's (lr, weight decay) and this key: each row names them.
    assert [label.split(", ")[0] for label in labels] == [
        f"label smoothing {v:.3g}" for v in values
    ]


# --- slow: several processes, and the preset end to end ------------------------------


@pytest.mark.slow  # four torchrun launches of two processes
def test_torchrun_with_every_switch_resumes_as_one_run(tmp_path: Path) -> None:
    job = [
        "dataset=synthetic",
        "data.synthetic_train=512",
        "data.synthetic_test=128",
        "depth=8",
        "data.batch_size=64",
        "trainer.deterministic=true",
        "schedule.gamma=1",  # a constant lr: the same schedule for a 6-step and a 10-step run
        "trainer.log_every=5",
        "trainer.progress=false",
        *ALL,
    ]

    def torchrun(args: list[str]) -> None:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
               "--nproc_per_node=2", "-m", "resnet_exp", *args]  # fmt: skip
        env = {**os.environ, **ONE_THREAD}
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    whole, part = tmp_path / "whole", tmp_path / "part"
    torchrun([*job, "trainer.max_steps=10", f"hydra.run.dir={whole}"])
    torchrun([*job, "trainer.max_steps=6", f"hydra.run.dir={part}"])
    torchrun(["trainer.max_steps=10", f"resume={part}"])
    got, want = outcome(part), outcome(whole)
    got["state"].pop("scheduler")  # the 6-step run set its milestones for its own length
    want["state"].pop("scheduler")
    for run in (got, want):  # the part run evaluated and logged at its step 6 too
        run["rows"] = [r for r in run["rows"] if r["step"] != 6]
        run["scalars"] = {
            t: {s: v for s, v in p.items() if s != 6} for t, p in run["scalars"].items()
        }
    assert read_checkpoint(part)["world"] == 2 and len(got["state"]["ranks"]) == 2
    assert all("ema_buffers" in r and "batch_aug_gen" in r["loader"] for r in got["state"]["ranks"])
    assert_same_tensors(got, want)


@pytest.mark.slow  # four short runs of the preset's nets (one epoch of a small data set)
def test_modern_preset_one_epoch_runs_and_reports(tmp_path: Path) -> None:
    sweep = tmp_path / "modern"
    run_cli(
        ["-m", "+experiment=modern", "scale=short", "dataset=synthetic",
         "data.synthetic_train=640", "data.synthetic_test=64", "data.batch_size=64",
         "model.bn_group=32", "data.eval_batch_size=64", "data.train_limit=null",
         "data.test_limit=null", "trainer.max_steps=null", "trainer.epochs=1",
         "trainer.progress=false", "trainer.device=cpu", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        env=ONE_THREAD,
    )  # fmt: skip
    runs = sorted(p.parent.parent for p in sweep.rglob(".hydra/config.yaml"))
    assert len(runs) == 4
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        assert s["status"] == "completed" and s["steps_done"] == 10 and s["schedule"] == "cosine"
        assert 0 <= s["final_test_error_ema"] <= 100
        state = read_checkpoint(run)
        assert state["ema"]["n_averaged"].item() == 10
    with open(sweep / "report.csv") as f:
        rows = {r["configuration"]: r for r in csv.DictReader(f)}
    recipe = "cosine + label smoothing 0.1 + EMA 0.999 + cutout 16"
    assert {r["recipe"] for r in rows.values()} == {recipe}
    assert set(rows) == {f"ResNet-{d}, {b}" for d in (20, 29) for b in ("original", "preact")}
    assert all(r["median_error_ema"] for r in rows.values())
