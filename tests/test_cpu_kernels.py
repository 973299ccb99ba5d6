"""CPU kernel hazards the trainer steers around."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_exp import build_model
from resnet_exp.train.runtime import nhwc_unsafe_convs, pick_channels_last

from conftest import ONE_THREAD, run_cli

# A strided 1x1 conv with 8 inputs, backward in channels_last: the shape that crashes
# oneDNN on AVX-512 CPUs (an ImageNet net at model.width=8: stage 2's projection).
PROBE = """
import torch
from torch import nn
conv = nn.Conv2d(8, 16, 1, 2, bias=False).to(memory_format=torch.channels_last)
ref = nn.Conv2d(8, 16, 1, 2, bias=False)
ref.load_state_dict(conv.state_dict())
x = torch.randn(32, 8, 56, 56)
conv(x.to(memory_format=torch.channels_last)).sum().backward()
ref(x).sum().backward()
print(torch.allclose(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3))
"""


@functools.cache
def nhwc_kernel_broken() -> bool:
    """Whether this CPU's kernel crashes (or miscomputes) on PROBE, in a subprocess."""
    env = {**os.environ, **ONE_THREAD}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env
    )
    return proc.returncode != 0 or proc.stdout.strip() != "True"


def test_unsafe_layers_are_the_strided_narrow_1x1_convs() -> None:
    with torch.device("meta"):
        narrow = build_model("preact", 18, 10, family="imagenet", width=8)
        wide = build_model("preact", 18, 10, family="imagenet", width=16)
        cifar = build_model("preact", 20, 10)  # zero-padding shortcuts: no 1x1 convs
    (name,) = nhwc_unsafe_convs(narrow)  # stage 2's projection, 8 -> 16 channels
    conv = narrow.get_submodule(name)
    assert (conv.in_channels, conv.out_channels, conv.stride) == (8, 16, (2, 2))
    assert nhwc_unsafe_convs(wide) == [] and nhwc_unsafe_convs(cifar) == []
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not pick_channels_last(True, narrow, cpu)
    assert pick_channels_last(True, narrow, cuda) and pick_channels_last(True, wide, cpu)
    assert not pick_channels_last(False, wide, cpu)
    assert nhwc_unsafe_convs(nn.Conv2d(8, 8, 1, 2)) == [""]


@pytest.mark.skipif(
    not nhwc_kernel_broken(), reason="this CPU's oneDNN trains a strided 1x1 conv in NHWC"
)
def test_a_net_with_such_a_layer_trains_on_an_affected_cpu(tmp_path: Path) -> None:
    """Without the guard, this run dies with a segfault (exit -11) in its first backward."""
    run = tmp_path / "run"
    proc = run_cli(
        [
            "dataset=synthetic",
            "data.image_size=224",
            "data.synthetic_train=32",
            "data.synthetic_test=8",
            "data.batch_size=32",
            "model.family=imagenet",
            "depth=18",
            "model.width=8",
            "trainer.max_steps=1",
            "trainer.precision=fp32",
            "trainer.progress=false",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["channels_last"] is False
    log = proc.stdout + proc.stderr
    assert log.count("trainer.channels_last=true ignored") == 1  # logged once
