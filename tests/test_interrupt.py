"""Interrupting and resuming: bit-exact continuation, signals, atomic checkpoints, sweeps."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from resnet_exp.config import Config, flat_config
from resnet_exp.errors import UserError
from resnet_exp.run.checkpoint import Checkpoint
from resnet_exp.run.resume import check_resumable, with_inherited_overrides
from resnet_exp.run.stop import Abort, Interrupted, StopRequest
from resnet_exp.train.loop import train

from conftest import (
    TINY,
    assert_same_tensors,
    compose_config,
    outcome,
    read_checkpoint,
    read_summary,
    run_main,
    signal_after_first_evaluation,
    stop_at_poll,
)

# conftest's tiny job: 16 steps an epoch, deterministic, a logging step every 5.
JOB = [*TINY, "trainer.log_every=5", "trainer.deterministic=true"]
STEPS_PER_EPOCH = 16
# The paper schedule over 6 epochs: lr / 10 at steps 48 and 72, after any stop below.
PAPER = [*JOB, "trainer.epochs=6"]
# Constant lr after an 8-step warm-up: a run cut short by max_steps has the same
# schedule as a longer one (paper milestones are fractions of the run's length).
FLAT = [
    *JOB,
    "trainer.epochs=3",
    "schedule.gamma=1.0",
    "schedule.warmup=true",
    "schedule.warmup_steps=8",
]


def train_in(run_dir: Path, overrides: list[str], stop: StopRequest | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(compose_config(overrides), run_dir, stop)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs to compare against."""
    root = tmp_path_factory.mktemp("reference")
    for name, overrides in (("paper", PAPER), ("flat", FLAT)):
        train_in(root / name, overrides)
    return {"paper": root / "paper", "flat": root / "flat"}


def assert_identical(resumed: Path, reference: Path, extra_step: int | None = None) -> None:
    """Same weights, optimizer, schedule, data position, RNG; same metrics and curves.

    ``extra_step``: a run stopped by max_steps evaluated and logged there once more.
    """
    got, want = outcome(resumed), outcome(reference)
    if extra_step is not None:
        # The shorter run set its milestones (unused here: gamma 1) for its own length.
        for o in (got, want):
            o["state"]["scheduler"]["_schedulers"][1].pop("milestones")
    for key, value in want["state"].items():
        assert_same_tensors(got["state"][key], value, key)
    assert [r for r in got["rows"] if r["step"] != extra_step] == want["rows"]
    assert got["scalars"].keys() == want["scalars"].keys()
    for tag, points in got["scalars"].items():
        assert {s: v for s, v in points.items() if s != extra_step} == want["scalars"][tag], tag
    assert got["summary"] == want["summary"]


def test_stop_mid_epoch_then_resume_is_bit_identical(
    tmp_path: Path, references: dict[str, Path]
) -> None:
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as info:
        train_in(run, PAPER, stop=stop_at_poll(STEPS_PER_EPOCH + 5))
    assert info.value.step == STEPS_PER_EPOCH + 5  # mid-epoch, mid logging interval
    summary = read_summary(run)
    assert summary["status"] == "interrupted" and summary["steps_done"] == info.value.step
    assert read_checkpoint(run)["step"] == info.value.step

    train_in(run, [*PAPER, f"resume={run}"])
    assert_identical(run, references["paper"])


def test_max_steps_stop_then_longer_run_is_bit_identical(
    tmp_path: Path, references: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    stop_at = 2 * STEPS_PER_EPOCH - 5  # mid-epoch, not a logging step
    train_in(run, [*FLAT, f"trainer.max_steps={stop_at}"])
    with caplog.at_level(logging.INFO, logger="resnet_exp"):
        train_in(run, [*FLAT, "trainer.max_steps=null", f"resume={run}"])
    assert f"trainer.max_steps: {stop_at} -> None" in caplog.text
    assert_identical(run, references["flat"], extra_step=stop_at)


def test_sigterm_through_the_command_then_resume_is_bit_identical(
    tmp_path: Path, references: dict[str, Path]
) -> None:
    run = tmp_path / "run"
    rc, text = signal_after_first_evaluation(
        [*PAPER, f"hydra.run.dir={run}"], tmp_path, [run / "metrics.jsonl"], signal.SIGTERM
    )
    assert rc == 128 + signal.SIGTERM, text
    assert "Traceback" not in text
    step = read_summary(run)["steps_done"]
    assert f"stopped by SIGTERM after step {step}; checkpoint: {run / 'last.pt'}" in text
    assert f"to continue: resnet-exp resume={run}" in text
    assert read_checkpoint(run)["step"] == step

    # The checkpoint remembers the run's overrides: resume=DIR alone continues it.
    resumed = run_main([f"resume={run}"], cwd=tmp_path)
    assert f"resumed from {run / 'last.pt'} at step {step}" in resumed.stdout
    assert_identical(run, references["paper"])


def test_second_signal_stops_at_once_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    good = {
        k: torch.zeros(1) for k in ("model", "optimizer", "scheduler", "scaler", "loader", "rng")
    }
    Checkpoint(path, {**good, "step": 1}).save()

    class SignalWhilePickled:
        def __reduce__(self) -> Any:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-write
            return (int, (0,))

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background
    stop = StopRequest()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(Abort):
            Checkpoint(path, {**good, "step": 2, "x": [SignalWhilePickled()] * 100}).save()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a third one kills
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back
    assert Checkpoint.load(path).state["step"] == 1
    assert not (tmp_path / ".last.pt.tmp").exists()


class PauseWhilePickled:
    """Pickled inside ``torch.save``: tells the parent it is there, then waits to be killed."""

    def __init__(self, ready: int) -> None:
        self.ready = ready

    def __reduce__(self):
        os.write(self.ready, b"x")
        signal.pause()  # until SIGKILL
        raise AssertionError("not reached")


@pytest.mark.parametrize("where", ["pickling", "fsync"])
def test_sigkill_mid_write_never_leaves_a_broken_checkpoint(tmp_path: Path, where: str) -> None:
    """A process killed while it writes a checkpoint, at a point the test chooses (the
    child says when it is there): while the state is pickled into the temporary file,
    or once that file is written, before the rename. last.pt is the previous one."""
    path = tmp_path / "last.pt"
    tmp = tmp_path / ".last.pt.tmp"

    def state(step: int) -> dict[str, Any]:
        big = torch.full((2_000_000,), float(step))
        return {k: big for k in ("model", "optimizer", "scheduler", "scaler", "loader", "rng")}

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one complete checkpoint, then one it never finishes
        try:
            Checkpoint(path, {**state(1), "step": 1}).save()
            if where == "pickling":
                Checkpoint(path, {**state(2), "step": 2, "x": PauseWhilePickled(ready_w)}).save()
            else:

                def fsync(fd: int) -> None:  # the data is written; the rename comes next
                    os.write(ready_w, b"x")
                    signal.pause()

                os.fsync = fsync
                Checkpoint(path, {**state(2), "step": 2}).save()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"  # the child is inside the write
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
    assert tmp.exists()  # killed mid-write ...
    if where == "fsync":
        assert tmp.stat().st_size > 8_000_000  # (the new checkpoint's data is all there)
    state_on_disk = Checkpoint.load(path).state  # ... and last.pt is the previous, complete one
    assert state_on_disk["step"] == 1
    assert torch.equal(state_on_disk["model"], torch.full((2_000_000,), 1.0))


def test_truncated_or_foreign_checkpoints_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    Checkpoint(
        good,
        {
            k: torch.zeros(1000)
            for k in ("model", "optimizer", "scheduler", "scaler", "loader", "rng", "step")
        },
    ).save()
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "empty.pt": b"",
        "garbage.pt": os.urandom(4096),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    for name in [*cases, "foreign.pt"]:
        with pytest.raises(
            UserError,
            match=rf"checkpoint {tmp_path / name} is (truncated or corrupt|not a resnet-exp)",
        ):
            Checkpoint.load(tmp_path / name)
    with pytest.raises(UserError, match="does not exist"):
        Checkpoint.load(tmp_path / "missing.pt")


def test_resume_refuses_model_and_data_changes_and_lists_safe_ones(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_in(run, [*FLAT, "trainer.max_steps=3"])
    path = run / "last.pt"
    state = read_checkpoint(path)
    for override, key in (
        ("depth=14", "depth"),
        ("block=original", "model.block"),
        ("data.batch_size=32", "data.batch_size"),
        ("data.synthetic_train=512", "data.synthetic_train"),
        ("seed=1", "seed"),
    ):
        flat = flat_config(compose_config([*FLAT, "trainer.max_steps=3", override]))
        with pytest.raises(UserError, match=rf"cannot resume from .*{key}=") as info:
            check_resumable(state, flat, path)
        assert "\n" not in str(info.value)
    # A checkpoint without its config is checked by the config hash alone.
    flat = flat_config(compose_config([*FLAT, "trainer.max_steps=3", "depth=14"]))
    with pytest.raises(UserError, match="its config hash differs"):
        check_resumable({**state, "config": None}, flat, path)
    flat = flat_config(
        compose_config(
            [*FLAT, "trainer.max_steps=9", "trainer.log_every=2", "trainer.eval_every=2"]
        )
    )
    assert check_resumable(state, flat, path) == [
        "trainer.eval_every: 1 -> 2",
        "trainer.log_every: 5 -> 2",
        "trainer.max_steps: 3 -> 9",
    ]


def test_resuming_a_finished_run_changes_nothing_and_fewer_steps_are_refused(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    first = train_in(run, [*FLAT, "trainer.max_steps=3"])
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert train_in(run, [*FLAT, "trainer.max_steps=3", f"resume={run}"]) == first
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    with pytest.raises(UserError, match=r"is at step 3, past this run's 2 steps"):
        train_in(run, [*FLAT, "trainer.max_steps=2", f"resume={run}"])


def test_resume_path_inherits_the_runs_overrides(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    good = {
        k: torch.zeros(1) for k in ("model", "optimizer", "scheduler", "scaler", "loader", "rng")
    }
    saved = ["depth=8", "dataset=synthetic", "trainer.max_steps=12", "hydra.run.dir=/old"]
    Checkpoint(run / "last.pt", {**good, "step": 12, "overrides": saved}).save()
    got = with_inherited_overrides(["trainer.max_steps=20", f"resume={run}"])
    assert got == ["depth=8", "dataset=synthetic", "trainer.max_steps=20", f"resume={run}"]
    assert with_inherited_overrides(["-m", f"resume={run}"]) == ["-m", f"resume={run}"]
    assert with_inherited_overrides(["resume=auto"]) == ["resume=auto"]


def test_sweep_goes_on_after_failures_and_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four jobs: completes, internal error (an injected fault), bad input, divergence."""
    from resnet_exp import cli

    sweep = tmp_path / "sweep"
    real = cli.run

    def run(cfg: Config, ctx) -> dict:
        if cfg.optimizer.lr == 0.2:
            raise RuntimeError("injected fault")
        return real(cfg, ctx)

    monkeypatch.setattr(cli, "run", run)
    args = [
        "-m",
        "optimizer.lr=0.1,0.2,-1,1e30",
        *JOB,
        "trainer.max_steps=4",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_main(args, cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "resnet-exp: 3 of 4 jobs failed: 1_preact_8 (failed), 2_preact_8 (failed), 3_preact_8 (diverged)"
    ), last
    status = {d.name: read_summary(d) for d in sorted(sweep.iterdir()) if d.is_dir()}
    assert status["0_preact_8"]["status"] == "completed"
    assert status["1_preact_8"] == {"status": "failed", "error": "RuntimeError: injected fault"}
    assert "Traceback" in (sweep / "1_preact_8" / "resnet-exp.log").read_text()  # for a bug report
    assert status["2_preact_8"]["error"] == "optimizer.lr=-1.0 must be a positive number"
    assert (
        status["3_preact_8"]["status"] == "diverged"
        and status["3_preact_8"]["diverged_at_step"] >= 1
    )
    assert "Traceback" not in proc.stderr
