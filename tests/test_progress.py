"""Progress output: a bar on a terminal, one plain line per logging step in a file."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

from resnet_exp.train.loop import train
from resnet_exp.train.progress import Progress

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
