"""Packed runs train at the same time, and what a pack refuses or takes in turn.

The overlap is shown by a barrier inside the step loop: each run, after its third
step, waits for the other run to reach its own third step. Runs that went one after
another (the set-up gate held for a whole run, a launcher that joins each run's
thread) would leave the first run waiting alone: its barrier times out and the run
fails.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from resnet_exp.train.loop import Trainer

from conftest import TINY, Result, read_summary, run_main

SHORT = [*TINY, "trainer.log_every=5", "trainer.max_steps=6"]
PACKED = ["hydra/launcher=packed", "hydra.launcher.threads_per_run=1"]
MEET_AT = 3  # the step after which both runs must be in their loops together


def packed_sweep(tmp_path: Path, args: list[str], runs_per_device: int = 2) -> Result:
    """A packed sweep into ``tmp_path/s``, through the command's entry function."""
    return run_main(
        ["-m", *args, *PACKED, f"hydra.launcher.runs_per_device={runs_per_device}",
         f"hydra.sweep.dir={tmp_path / 's'}"],
        tmp_path,
        check=False,
    )  # fmt: skip


def test_packed_runs_are_inside_their_step_loops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a failure waits this long: the second run sets up in about a second.
    barrier = threading.Barrier(2, timeout=120)
    met: dict[str, int] = {}
    real = Trainer.train_step

    def train_step(self: Trainer) -> None:
        real(self)
        if self.step == MEET_AT:
            barrier.wait()  # BrokenBarrierError (the run fails) if the other never comes
            met[self.run_dir.name] = self.step

    monkeypatch.setattr(Trainer, "train_step", train_step)
    sweep = tmp_path / "s"
    result = packed_sweep(tmp_path, ["block=original,preact", *SHORT])
    assert result.returncode == 0, result.stderr
    assert sorted(met) == ["0_original_8", "1_preact_8"]
    for name in met:
        summary = read_summary(sweep / name)
        assert (summary["status"], summary["steps_done"]) == ("completed", 6)


def test_one_run_at_a_time_does_not_overlap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the barrier test: with runs_per_device=1 a pack runs its jobs
    one after another, and a step-loop barrier between them is never met."""
    inside: list[str] = []
    active = threading.Semaphore(1)
    real = Trainer.train_step

    def train_step(self: Trainer) -> None:
        if self.step == 0:  # the run's first step: the loop is entered
            assert active.acquire(blocking=False), "two runs in their step loops at once"
            inside.append(self.run_dir.name)
        real(self)
        if self.step == self.s.total_steps:
            active.release()

    monkeypatch.setattr(Trainer, "train_step", train_step)
    result = packed_sweep(tmp_path, ["block=original,preact", *SHORT], runs_per_device=1)
    assert result.returncode == 0, result.stderr
    assert inside == ["0_original_8", "1_preact_8"]


# --- what a pack refuses, before any run starts, and what it takes in turn -----------


def test_packing_refuses_chdir(tmp_path: Path) -> None:
    result = packed_sweep(tmp_path, ["seed=1,2", *SHORT, "hydra.job.chdir=true"])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "resnet-exp: error: hydra.job.chdir=true cannot be packed: the working directory "
        "is one per process"
    )
    assert not list(tmp_path.rglob("*_preact_8"))  # nothing written


def test_packing_refuses_jobs_with_different_env_set(tmp_path: Path) -> None:
    """Hydra refuses to sweep its own keys, but a config group can set them per job:
    two presets (on the search path) that set different environment variables."""
    presets = tmp_path / "presets" / "experiment"
    presets.mkdir(parents=True)
    for value in ("a", "b"):
        (presets / f"env_{value}.yaml").write_text(
            f"# @package _global_\nhydra:\n  job:\n    env_set:\n      RESNET_EXP_TEST_VAR: {value}\n"
        )
    result = packed_sweep(
        tmp_path,
        ["+experiment=env_a,env_b", f"hydra.searchpath=[file://{presets.parent}]", *SHORT],
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "resnet-exp: error: hydra.job.env_set differs between jobs 0_preact_8 "
        "({'RESNET_EXP_TEST_VAR': 'a'}) and 1_preact_8 ({'RESNET_EXP_TEST_VAR': 'b'}); it is "
        "one setting per process: pack such jobs in separate sweeps"
    )
    assert not list(tmp_path.rglob("*_preact_8"))


def test_packed_diagnose_runs_measure_what_a_run_alone_measures(tmp_path: Path) -> None:
    """mode=diagnose packs (its runs take their turn): each run's gradflow.csv is the
    one its run alone writes, and the sweep ends with the overlay of both."""
    args = ["mode=diagnose", *TINY, "diagnose.batch_size=8"]
    result = packed_sweep(tmp_path, [*args, "block=original,preact"])
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "s"
    assert (sweep / "gradflow_overlay.png").exists() and (sweep / "gradflow_overlay.csv").exists()
    for name, block in (("0_original_8", "original"), ("1_preact_8", "preact")):
        alone = tmp_path / f"alone_{block}"
        run_main([*args, f"block={block}", f"hydra.run.dir={alone}"], tmp_path)
        packed = (sweep / name / "gradflow.csv").read_text()
        assert packed == (alone / "gradflow.csv").read_text(), name
        assert len(packed.splitlines()) > 3
