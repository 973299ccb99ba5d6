"""GPU-only checks (skipped without CUDA): the CUDA-graph step trains exactly like the eager one."""

from __future__ import annotations

import copy

import pytest
import torch

from resnet_exp.config import DataConfig, OptimizerConfig, ScheduleConfig
from resnet_exp.data import Normalize, TrainLoader, load_dataset
from resnet_exp.models import build_model
from resnet_exp.train.optim import build_optimizer, build_scheduler
from resnet_exp.train.step import CudaGraphStep, EagerStep, make_train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_steps(graphs: bool, precision: str, steps: int = 12, resume_state=None):
    torch.manual_seed(0)
    device = torch.device("cuda")
    data = load_dataset(
        DataConfig(name="synthetic", synthetic_train=1024, synthetic_test=10, cache_dir="")
    )
    model = build_model("original", 20).to(device, memory_format=torch.channels_last)
    loader = TrainLoader(data.train, 64, Normalize(data.mean, data.std, device), device, seed=0)
    opt = build_optimizer(model, OptimizerConfig(), fused=True)
    # A warm-up and a decay inside the window: the graph must follow the scheduler's lr.
    sched = build_scheduler(
        opt, ScheduleConfig(warmup_steps=4, milestones=[0.5]), steps, warmup=True
    )
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    step = make_train_step(
        model, opt, scaler, device, precision, cuda_graphs="true" if graphs else "false"
    )
    assert isinstance(step, CudaGraphStep if graphs else EagerStep)
    if resume_state is not None:  # copies: the optimizer updates loaded buffers in place
        model.load_state_dict(copy.deepcopy(resume_state["model"]))
        opt.load_state_dict(copy.deepcopy(resume_state["opt"]))
    losses = []
    for _ in range(steps):
        loss, _ = step(*loader.next())
        sched.step()
        losses.append(loss.item())
    return model, opt, losses


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
