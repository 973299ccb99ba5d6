"""The documented alternatives to the paper's recipe, trained through the trainer on a
learnable synthetic task: ``optimizer=adamw``, ``schedule=cosine`` with its warm-up,
``trainer.precision=bf16`` and ``trainer.compile=true`` on the CPU. Each run's
training loss goes down."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from resnet_exp.train.loop import train

from conftest import TINY, compose_config, read_checkpoint, read_summary, tb_scalars

STEPS = 48  # three epochs of the tiny task
JOB = [*TINY, "trainer.log_every=8", f"trainer.max_steps={STEPS}"]


def run(tmp_path: Path, overrides: list[str]) -> tuple[dict, dict[str, dict[int, float]]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(compose_config([*JOB, *overrides]), run_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps_done"] == STEPS
    return summary, tb_scalars(run_dir)


def assert_learns(scalars: dict[str, dict[int, float]]) -> None:
    """The last logging interval's mean loss well below the first's (~ln 10 at start)."""
    loss = scalars["train/loss"]
    first, last = loss[min(loss)], loss[max(loss)]
    assert math.isfinite(last) and last < 0.7 * first, loss


def test_adamw_trains(tmp_path: Path) -> None:
    # its default lr (1e-3) is for full runs; this short one takes 1e-2, held constant
    summary, scalars = run(tmp_path, ["optimizer=adamw", "optimizer.lr=0.01", "schedule.gamma=1"])
    assert summary["optimizer"] == "adamw"
    state = read_checkpoint(tmp_path / "run")["optimizer"]
    group = state["param_groups"][0]
    assert (group["initial_lr"], group["weight_decay"], tuple(group["betas"])) == (
        1e-2,
        5e-2,
        (0.9, 0.999),
    )
    assert all("exp_avg_sq" in s for s in state["state"].values())  # Adam's moments
    assert_learns(scalars)


def test_cosine_schedule_with_warm_up(tmp_path: Path) -> None:
    """lr x0.1 for the warm-up steps, then a cosine from lr down to min_lr at the end."""
    warm, lr, floor = 8, 0.1, 0.001
    _, scalars = run(
        tmp_path,
        ["schedule=cosine", "schedule.warmup=true", f"schedule.warmup_steps={warm}",
         f"schedule.min_lr={floor}", "trainer.log_every=1"],
    )  # fmt: skip
    logged = scalars["lr"]  # at step s: the lr of step s + 1 (the schedule has stepped)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for s, value in logged.items():
        if s < warm:
            want = 0.1 * lr
        else:
            t = (s - warm) / (STEPS - warm)
            want = floor + (lr - floor) * (1 + math.cos(math.pi * t)) / 2
        assert value == pytest.approx(want, rel=1e-5, abs=1e-9), (s, value, want)
    assert logged[STEPS] == pytest.approx(floor)
    assert_learns(scalars)


def test_bf16_on_the_cpu_trains(tmp_path: Path) -> None:
    summary, scalars = run(tmp_path, ["trainer.precision=bf16"])
    assert summary["precision"] == "bf16"
    assert_learns(scalars)


@pytest.mark.slow  # torch.compile builds C++ kernels on the CPU: a minute or more
def test_compile_on_the_cpu_trains(tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    _, scalars = run(tmp_path, ["trainer.compile=true"])
    assert counters["stats"]["unique_graphs"] > 0  # the step ran through a compiled graph
    assert_learns(scalars)
