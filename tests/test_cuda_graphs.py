"""GPU-only checks (skipped without CUDA): the CUDA-graph step trains exactly like the eager one."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from resnet_exp.train.context import resolve
from resnet_exp.train.setup import build_setup
from resnet_exp.train.step import CudaGraphStep, EagerStep

from conftest import compose_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_steps(graphs: bool, precision: str, steps: int = 12, resume_state=None, extra=()):
    """ResNet-20 on synthetic images, set up as the trainer sets up a run (``extra``:
    more overrides; with trainer.ema the average is updated after each step, as the
    trainer does, and returned in place of the optimizer)."""
    cfg = compose_config(
        [
            "dataset=synthetic",
            "data.synthetic_train=1024",
            "data.synthetic_test=10",
            "data.cache_dir=",
            "block=original",
            "depth=20",
            "data.batch_size=64",
            "trainer.device=cuda",
            f"trainer.precision={precision}",
            f"trainer.cuda_graphs={str(graphs).lower()}",
            f"trainer.max_steps={steps}",
            # A warm-up and a decay inside the window: the graph must follow the scheduler's lr.
            "schedule.warmup=true",
            "schedule.warmup_steps=4",
            "schedule.milestones=[0.5]",
            *extra,
        ]
    )
    s = build_setup(cfg, resolve(cfg, Path("unused")))  # no run folder: nothing is written
    torch.backends.cudnn.benchmark = False  # the same kernels in both runs
    assert isinstance(s.train_step, CudaGraphStep if graphs else EagerStep)
    if resume_state is not None:  # copies: the optimizer updates loaded buffers in place
        s.model.load_state_dict(copy.deepcopy(resume_state["model"]))
        s.optimizer.load_state_dict(copy.deepcopy(resume_state["opt"]))
    losses = []
    for _ in range(steps):
        loss, _ = s.train_step(*s.loader.next())
        if s.ema is not None:
            s.ema.update(s.model)
        s.scheduler.step()
        losses.append(loss.item())
    return s.model, (s.optimizer if s.ema is None else s.ema.module), losses


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_step_matches_eager(precision: str) -> None:
    torch.backends.cudnn.deterministic = True
    eager, _, eager_losses = run_steps(False, precision)
    graphed, _, graph_losses = run_steps(True, precision)
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert graph_losses == pytest.approx(eager_losses, rel=tol, abs=tol)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol, msg=name)


def test_cuda_graph_step_from_resumed_optimizer_state() -> None:
    """Capturing after a resume keeps the loaded momentum buffers (not zeroed)."""
    torch.backends.cudnn.deterministic = True
    model, opt, _ = run_steps(False, "fp32", steps=6)
    state = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": opt.state_dict(),
    }
    eager, _, el = run_steps(False, "fp32", steps=6, resume_state=state)
    graphed, _, gl = run_steps(True, "fp32", steps=6, resume_state=state)
    assert gl == pytest.approx(el, rel=1e-4, abs=1e-4)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_cuda_graph_step_with_the_switches_beyond_the_paper_matches_eager() -> None:
    """Label smoothing and soft targets (mixup or cutmix, after cutout) inside the
    captured step, the weight average updated after each replay: as the eager step."""
    torch.backends.cudnn.deterministic = True
    extra = (
        "trainer.label_smoothing=0.1",
        "data.cutout=8",
        "data.mixup_alpha=0.4",
        "data.cutmix_alpha=1.0",
        "trainer.ema.decay=0.9",
    )
    eager, eager_avg, el = run_steps(False, "fp32", extra=extra)
    graphed, graph_avg, gl = run_steps(True, "fp32", extra=extra)
    plain, _, pl = run_steps(False, "fp32")
    assert gl == pytest.approx(el, rel=1e-4, abs=1e-4)
    assert el != pytest.approx(pl, rel=1e-3)  # the switches changed the losses
    for a, b in zip(eager_avg.state_dict().values(), graph_avg.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-4)
