"""trainer.time_limit: a clean stop before the limit, resumable; bad limits refused."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from resnet_exp.config import parse_duration
from resnet_exp.errors import UserError
from resnet_exp.run.result import RunResult, Status
from resnet_exp.run.stop import Interrupted, StopRequest, TimeLimit
from resnet_exp.train.loop import train

from conftest import (
    TINY,
    assert_same_tensors,
    compose_config,
    outcome,
    read_checkpoint,
    read_summary,
    run_main,
)

# 16 steps an epoch, 4 epochs: evaluations, checkpoints and lr milestones on the way.
JOB = [*TINY, "trainer.log_every=5", "trainer.deterministic=true", "trainer.epochs=4"]


def test_durations_parse_and_bad_ones_are_named() -> None:
    assert parse_duration("90s") == 90 and parse_duration("25m") == 1500
    assert parse_duration("2h") == 7200 and parse_duration("1.5h") == 5400
    assert parse_duration(45) == 45 and parse_duration(None) is None
    for bad in ("soon", "-5", "0", "5x", "inf", "m"):
        with pytest.raises(UserError, match=rf"trainer.time_limit='{bad}' is not a positive"):
            parse_duration(bad)


@pytest.mark.parametrize("bad", ["soon", "-5"])
def test_a_bad_limit_is_one_line_and_exit_2(bad: str, tmp_path: Path) -> None:
    proc = run_main(
        [*TINY, f"trainer.time_limit={bad}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"resnet-exp: error: trainer.time_limit='{bad}' is not a positive duration: pass "
        "seconds or a number with s, m or h (90s, 25m, 2h), or null for no limit"
    ]
    assert not (tmp_path / "run" / "last.pt").exists()


class Ticks:
    """A clock that advances one 'second' per reading: the time limit's stop then falls
    on the same step in every run, whatever the machine's speed."""

    def __init__(self) -> None:
        self.count = itertools.count()

    def __call__(self) -> float:
        return float(next(self.count))


def test_the_estimate_covers_a_stops_measured_costs() -> None:
    clock = Ticks()
    limit = TimeLimit(
        100.0,
        StopRequest(clock=clock),
        eval_images=64,
        batch_size=16,
        state_bytes=0,
        log_every=5,
    )
    first = limit.needed()  # nothing measured yet: a second for the checkpoint, the floor
    assert first == pytest.approx(TimeLimit.SAFETY * 1.0 + TimeLimit.FLOOR_S)
    limit.begin()
    limit.reached()
    assert limit.step_s == 1.0  # before the first evaluation: 4 batches at a step's cost
    assert limit.needed() == pytest.approx(TimeLimit.SAFETY * (4 + 1 + 6) + TimeLimit.FLOOR_S)
    with limit.timed("eval"):
        clock()  # the evaluation took 2 readings
    assert limit.eval_s == 2.0
    assert limit.needed() == pytest.approx(TimeLimit.SAFETY * (2 + 1 + 6) + TimeLimit.FLOOR_S)


def test_three_windows_end_bit_identical_to_one_run(tmp_path: Path) -> None:
    """A deterministic CPU run cut by its time limit into three windows, each continued
    with resume=auto, ends with the weights, optimizer, metrics and curves of the run
    made at once (wherever the cuts fall)."""
    whole = tmp_path / "whole"
    whole.mkdir()
    train(compose_config(JOB), whole)

    run = tmp_path / "windows"
    run.mkdir()
    cfg = compose_config([*JOB, "trainer.time_limit=50s", "resume=auto"])
    cuts: list[int] = []
    while True:
        try:
            done = train(cfg, run, StopRequest(clock=Ticks()))
            break
        except Interrupted as stop:
            assert stop.reason == "time_limit" and stop.signum is None
            summary = read_summary(run)
            assert summary["status"] == "interrupted" and summary["reason"] == "time_limit"
            assert summary["steps_done"] == stop.step and summary["steps"] == 64
            assert read_checkpoint(run)["step"] == stop.step
            cuts.append(stop.step)
            assert len(cuts) < 5, cuts
    assert done.status is Status.completed
    assert len(cuts) == 2 and 0 < cuts[0] < cuts[1] < 64, cuts  # three windows
    assert_same_tensors(outcome(run), outcome(whole))


def test_the_result_of_a_stop_at_the_limit_reads_back() -> None:
    result = RunResult(
        Status.interrupted, {"steps_done": 7, "steps": 64}, "stopped", reason="time_limit"
    )
    assert result.summary["reason"] == "time_limit" and "signal" not in result.summary
    back = RunResult.from_summary(result.summary)
    assert back == result and back.resumable and back.exit_code == 75
