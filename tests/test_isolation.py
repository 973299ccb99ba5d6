"""Tests leave torch's process-wide modes as they found them (conftest's fixture)."""

from __future__ import annotations

from pathlib import Path

import torch

from resnet_exp.train.loop import train

from conftest import TINY, compose_config, torch_modes_restored


def test_a_deterministic_run_and_cudnn_flags_are_undone(tmp_path: Path) -> None:
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic)
    assert not before[0]  # the suite runs in torch's default mode
    with torch_modes_restored():
        train(
            compose_config([*TINY, "trainer.max_steps=2", "trainer.deterministic=true"]), tmp_path
        )
        assert torch.are_deterministic_algorithms_enabled()  # what the run asked for
        cudnn.benchmark, cudnn.deterministic = not before[1], not before[2]  # as a GPU test does
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic) == (
        before
    )
