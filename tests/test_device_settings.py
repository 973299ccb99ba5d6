"""GPU settings checked on any machine: the device a run names is made current, torch.compile
modes with CUDA graphs of their own are not captured inside the step's graph, and fp32 means
fp32 (TF32 only when asked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet_exp.errors import UserError
from resnet_exp.train.context import resolve
from resnet_exp.train.setup import build_setup
from resnet_exp.train.step import make_train_step

from conftest import TINY, compose_config

NOWHERE = Path("unused")  # set-ups that write nothing


def test_a_named_gpu_is_made_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.device=cuda:1 outside packing and DDP: the step's streams and graphs must
    land on GPU 1, so the process's current device becomes it (two GPUs faked)."""
    made: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    cfg = compose_config([*TINY, "trainer.device=cuda:1", "trainer.precision=fp32"])
    ctx = resolve(cfg, NOWHERE)
    assert ctx.device == torch.device("cuda", 1) and made == [torch.device("cuda", 1)]


def test_compile_modes_with_graphs_of_their_own_are_not_captured() -> None:
    cfg = compose_config(TINY)
    ctx = resolve(cfg, NOWHERE)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(UserError, match=f"trainer.compile_mode other than {mode}"):
            make_train_step(model, opt, scaler, ctx, True, mode, "true")
    with pytest.raises(UserError) as info:
        make_train_step(model, opt, scaler, ctx, True, "max-autotune-no-cudagraphs", "true")
    assert "compile_mode" not in str(info.value)  # (refused here only for want of a GPU)


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_means_fp32_unless_tf32_is_asked_for(tf32: bool) -> None:
    torch.backends.cudnn.allow_tf32 = not tf32  # whatever was set before (cuDNN's default: on)
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    cfg = compose_config([*TINY, f"trainer.tf32={str(tf32).lower()}"])
    s = build_setup(cfg, resolve(cfg, NOWHERE))
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert s.info["tf32"] is tf32  # summary.json records it
