"""One RunResult per run: its summary, its exit status (mapped in one table), and
what a Python caller, a sweep and the CLI read from it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from resnet_exp import cli
from resnet_exp.errors import UserError
from resnet_exp.run.result import EXIT_CODES, Diverged, RunResult, Status
from resnet_exp.run.stop import Interrupted


def stopped(sig: signal.Signals, status: Status = Status.interrupted) -> RunResult:
    return RunResult(
        status,
        {"steps_done": 21, "checkpoint": "/run/last.pt"},
        "stopped by ... after step 21",
        reason=sig.name,
    )


def test_exit_codes() -> None:
    assert RunResult(Status.completed).exit_code == 0
    assert RunResult(Status.failed, message="bad").exit_code == 2
    assert RunResult(Status.diverged, message="nan").exit_code == 3
    assert RunResult(Status.pruned, {"pruned_at_epoch": 2}).exit_code == 0
    assert stopped(signal.SIGINT).exit_code == 130
    assert stopped(signal.SIGTERM).exit_code == 143
    # A stop asked for while the last evaluation ran: complete, yet the command stops.
    assert stopped(signal.SIGTERM, Status.completed).exit_code == 143
    # A time limit's stop is resumable: 75, not a signal's 128 + N.
    limited = RunResult(Status.interrupted, {"steps_done": 21}, reason="time_limit")
    assert limited.exit_code == 75 and limited.resumable and limited.signum is None
    assert RunResult(Status.not_started, reason="time_limit").exit_code == 75
    # Every ending but a stop by signal has its entry in the one table; a signal's is 128 + N.
    assert set(EXIT_CODES) == {
        Status.completed,
        Status.pruned,
        Status.failed,
        Status.diverged,
        Status.interrupted,
        Status.not_started,
    }


def test_the_summary_holds_the_status_and_reads_back() -> None:
    result = stopped(signal.SIGINT)
    assert result.summary["status"] == "interrupted" and result.summary["signal"] == "SIGINT"
    assert RunResult.from_summary(result.summary) == result
    failed = RunResult(Status.failed, message="UserError: bad lr")
    assert failed.summary == {"status": Status.failed, "error": "UserError: bad lr"}
    assert not RunResult.from_summary({}).ok  # no summary: unfinished
    assert RunResult.from_summary({}).status is Status.unfinished


def test_check_raises_what_a_python_caller_expects() -> None:
    done = RunResult(Status.completed, {"final_val_error": 1.0})
    assert done.check() is done
    pruned = RunResult(Status.pruned, {"final_val_error": 60.0, "pruned_at_epoch": 1})
    assert pruned.ok and pruned.check() is pruned  # a search's pruner stopped it: not a failure
    with pytest.raises(Interrupted) as info:
        stopped(signal.SIGINT).check()
    assert (info.value.signum, info.value.step) == (signal.SIGINT, 21)
    assert info.value.checkpoint == Path("/run/last.pt")
    with pytest.raises(Diverged, match="nan"):
        RunResult(Status.diverged, message="nan").check()
    with pytest.raises(UserError, match="bad"):
        RunResult(Status.failed, message="bad").check()


def test_leave_is_where_the_command_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    requeued: list[int] = []
    monkeypatch.setattr(cli, "requeue", requeued.append)
    for result, code in (
        (RunResult(Status.failed, message="bad"), 2),
        (RunResult(Status.diverged, message="nan"), 3),
        (stopped(signal.SIGTERM), 143),
    ):
        with pytest.raises(SystemExit) as info:
            cli.leave(result, multirun=False)
        assert info.value.code == code
    done = RunResult(Status.completed)
    assert cli.leave(done, multirun=False) is done
    pruned = RunResult(Status.pruned, {"pruned_at_epoch": 1})
    assert cli.leave(pruned, multirun=False) is pruned  # exit 0
    # In a sweep a failure is the Reporter's to count; a stop ends the sweep.
    failed = RunResult(Status.failed, message="bad")
    assert cli.leave(failed, multirun=True) is failed
    with pytest.raises(SystemExit) as info:
        cli.leave(stopped(signal.SIGINT), multirun=True)
    assert info.value.code == 130
    assert requeued == [signal.SIGTERM, signal.SIGINT]
