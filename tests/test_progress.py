"""Progress output: a bar on a terminal, one plain line per logging step in a file."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

from resnet_exp.train.loop import train
from resnet_exp.train.progress import Progress, duration

from conftest import TINY, compose_config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_file_a_run_logs_one_line_per_logging_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """pytest's captured stderr is not a terminal, as a SLURM log or ``| tee`` is not."""
    cfg = compose_config(
        [*TINY, "trainer.progress=true", "trainer.max_steps=20", "trainer.log_every=8"]
    )
    with caplog.at_level(logging.INFO, logger="resnet_exp"):
        train(cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    pattern = r"step (\d+)/20 epoch (\d+) \| loss \d+\.\d{4} err \d+\.\d{2}% \| \d+ img/s \| ETA \d\d:\d\d"
    assert [re.fullmatch(pattern, ln) is not None for ln in lines] == [True] * 3, lines
    steps = [tuple(map(int, re.fullmatch(pattern, ln).groups())) for ln in lines]  # type: ignore[union-attr]
    assert steps == [(8, 1), (16, 1), (20, 2)]  # 16 steps an epoch
    assert "\r" not in capsys.readouterr().err  # no bar updates in the file


def test_on_a_terminal_a_bar_and_no_lines(caplog: pytest.LogCaptureFixture) -> None:
    tty = Terminal()
    progress = Progress(0, 32, 16, stream=tty)
    with caplog.at_level(logging.INFO, logger="resnet_exp"):
        for step in range(1, 33):
            progress.step(step)
            if step % 8 == 0:
                progress.logged(step, 1.0, 50.0, 100.0)
    progress.close()
    assert "\r" in tty.getvalue() and "epoch 2/2" in tty.getvalue()
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]


def test_off_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    tty = Terminal()
    progress = Progress(0, 8, 4, enabled=False, stream=tty)
    with caplog.at_level(logging.INFO, logger="resnet_exp"):
        progress.step(1)
        progress.logged(4, 1.0, 50.0, 100.0)
    progress.close()
    assert tty.getvalue() == "" and not caplog.records


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def estimate_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("estimated")]


def test_the_run_length_is_estimated_once_from_the_first_timed_steps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first 2 steps (set-up costs: 30 s each here) are left out; the estimate comes
    once 10 s and 5 steps are timed at 2 s a step: 63,960 steps -> about 35.5 hours."""
    clock = FakeClock()
    tty = Terminal()
    progress = Progress(0, 63_960, 390, stream=tty, clock=clock)
    with caplog.at_level(logging.INFO, logger="resnet_exp"):
        for step in range(1, 20):
            clock.now += 30.0 if step <= 2 else 2.0
            progress.step(step)
    progress.close()
    (line,) = estimate_lines(caplog)
    # 60 s spent, 7 steps timed (3-7 is 5 steps, 10 s), 63,953 left at 0.5 steps/s
    left = (63_960 - 7) * 2.0
    assert progress.estimate == duration(60 + 10 + left) == "1d 11h"
    assert line.startswith("estimated length: 1d 11h for 63,960 steps at 0.5 steps/s (2 s a step, ")
    assert "timed over steps 3-7" in line and line.endswith(f"{duration(left)} left")
    assert "epoch 1/164, 1d 11h in all" in tty.getvalue()  # the bar shows it too


def test_a_resumed_run_estimates_what_is_left_and_plain_lines_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    progress = Progress(1000, 1600, 100, stream=io.StringIO(), clock=clock)  # not a terminal
    with caplog.at_level(logging.INFO, logger="resnet_exp"):
        for step in range(1001, 1100):
            clock.now += 0.5
            progress.step(step)
    (line,) = estimate_lines(caplog)
    # timed from step 1002: 20 steps make 10 s at 2 steps/s; 1022 -> 578 steps left
    assert line.startswith("estimated length: 5m 00s for 600 steps from step 1,000 at 2 steps/s")
    assert "timed over steps 1003-1022" in line


def test_no_estimate_for_a_run_too_short_to_time_or_with_progress_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for enabled, total in [(True, 6), (False, 1000)]:
        clock = FakeClock()
        progress = Progress(0, total, 10, enabled=enabled, stream=io.StringIO(), clock=clock)
        with caplog.at_level(logging.INFO, logger="resnet_exp"):
            for step in range(1, total + 1):
                clock.now += 5.0
                progress.step(step)
        assert progress.estimate is None
    assert estimate_lines(caplog) == []


def test_a_training_run_logs_its_estimate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's own steps reach the estimate (a zero-second window: the tiny
    run's steps take milliseconds)."""
    monkeypatch.setattr("resnet_exp.train.progress.ESTIMATE_AFTER_S", 0.0)
    cfg = compose_config([*TINY, "trainer.progress=true", "trainer.max_steps=20"])
    with caplog.at_level(logging.INFO, logger="resnet_exp"):
        train(cfg, tmp_path)
    (line,) = estimate_lines(caplog)
    assert re.match(r"estimated length: \S+ for 20 steps at [\d.e+]+ steps/s", line), line
    assert "timed over steps 3-7" in line
