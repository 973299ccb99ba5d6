"""The CPU paths: a kernel hazard the trainer steers around, and its precision choice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_exp import build_model
from resnet_exp.run import runtime
from resnet_exp.run.runtime import (
    nhwc_unsafe_convs,
    pick_channels_last,
    pick_precision,
    precision_choice,
)

from conftest import ONE_THREAD, TINY, fork_server, read_summary, run_command, run_main

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


def nhwc_kernel_broken(tmp_path: Path) -> bool:
    """Whether this CPU's kernel crashes (or miscomputes) on PROBE, in a fresh process."""
    proc = fork_server().run_code(PROBE, tmp_path, {**os.environ, **ONE_THREAD})
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
    assert not pick_channels_last(True, lambda: narrow, cpu)
    assert pick_channels_last(True, lambda: wide, cpu)
    unbuilt = lambda: pytest.fail("built for a choice that needs no net")  # noqa: E731
    assert pick_channels_last(True, unbuilt, cuda) and not pick_channels_last(False, unbuilt, cpu)
    assert nhwc_unsafe_convs(nn.Conv2d(8, 8, 1, 2)) == [""]


def test_a_net_with_such_a_layer_trains_on_an_affected_cpu(tmp_path: Path) -> None:
    """Without the guard, this run dies with a segfault (exit -11) in its first backward
    (in a process of its own: a crash would fail this test, not end the suite)."""
    if not nhwc_kernel_broken(tmp_path):
        pytest.skip("this CPU's oneDNN trains a strided 1x1 conv in NHWC")
    run = tmp_path / "run"
    proc = run_command(
        [
            "dataset=synthetic",
            "data.image_size=224",  # 56 px at the unsafe conv: smaller maps train safely
            "data.synthetic_train=4",
            "data.synthetic_test=4",
            "data.batch_size=4",  # a batch of 4 crashes as 32 does (measured)
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
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["channels_last"] is False
    log = proc.stdout + proc.stderr
    assert log.count("trainer.channels_last=true ignored") == 1  # logged once


def cpuinfo_flags() -> set[str] | None:
    """The kernel's list of CPU features (Linux): a source independent of torch's."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expect"),
    [(False, False, "fp32"), (False, True, "bf16"), (True, False, "bf16"), (True, True, "bf16")],
)
def test_auto_precision_on_a_cpu_follows_its_native_bf16_units(
    monkeypatch, amx: bool, avx512_bf16: bool, expect: str
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) == expect
    line = precision_choice("auto", cpu)  # what the run logs of the choice
    assert line is not None and line.startswith(f"trainer.precision=auto: {expect} on this CPU")
    assert pick_precision("fp32", cpu) == "fp32"  # an explicit choice stays
    assert precision_choice("fp32", cpu) is None  # and needs no word


@pytest.mark.skipif(cpuinfo_flags() is None, reason="no /proc/cpuinfo to check torch against")
def test_auto_precision_is_recorded_in_the_summary(tmp_path: Path) -> None:
    flags = cpuinfo_flags() or set()
    native = bool(flags & {"avx512_bf16", "amx_tile"}) and runtime.cpu_native_bf16() is not None
    expect = "bf16" if flags & {"avx512_bf16", "amx_tile"} else "fp32"
    assert ("bf16" if native else "fp32") == expect  # torch reports what the kernel lists
    run = tmp_path / "run"
    result = run_main([*TINY, "trainer.max_steps=2", f"hydra.run.dir={run}"], tmp_path)
    summary = read_summary(run)
    assert summary["precision"] == expect and summary["precision_requested"] == "auto"
    assert f"trainer.precision=auto: {expect} on this CPU" in result.stdout  # the choice, logged
