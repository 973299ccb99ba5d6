"""Device, precision, seeding and RNG state: the run's environment."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from resnet_exp.config import Precision
from resnet_exp.errors import UserError
from resnet_exp.models.options import choose
from resnet_exp.run.gpus import claim_gpu

log = logging.getLogger("resnet_exp")

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}
# oneDNN's backward-weights kernel for a strided 1x1 convolution in NHWC with fewer
# input channels than its block (16 on AVX-512) crashes (segfault, "double free")
# or returns wrong gradients on AVX-512 CPUs (torch 2.14.1; oneDNN issue 6035).
NHWC_MIN_CHANNELS = 16


def pick_device(name: str, local_rank: int | None = None, claim: bool = True) -> torch.device:
    """``auto``: the rank's own GPU in a data-parallel run; a GPU no other job holds
    when several are visible (``claim=False``: only check, claim none); else the GPU,
    or the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if local_rank is not None:
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.cuda.device_count() > 1 and claim:
            return torch.device("cuda", claim_gpu(torch.cuda.device_count()))
        return torch.device("cuda")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"trainer.device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"trainer.device={name!r} but no CUDA GPU is available; use trainer.device=cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"trainer.device={name!r} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    elif device.type != "cpu":
        raise UserError(f"trainer.device={name!r} is not supported (auto, cpu, cuda, cuda:N)")
    return device


def cpu_native_bf16() -> str | None:
    """The CPU's native bf16 units as torch's cpuinfo reports them (AMX tiles or
    AVX512-BF16 dot products), or None: oneDNN then emulates bf16, slower than fp32."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    checks = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for name, check in checks.items():
        if getattr(torch.cpu, check, lambda: False)():
            return name
    return None


def pick_precision(requested: Precision | str, device: torch.device) -> Precision:
    """``auto``: bf16 autocast on a GPU with bf16 (fp16 + grad scaling on older
    GPUs); on a CPU, bf16 where it has native bf16 units (AMX, AVX512-BF16), else
    fp32 (bf16 without them measured ~10x slower than fp32, AVX2 machine,
    ResNet-20). Measured CPU figures: docs/performance.md."""
    chosen = choose(Precision, requested, "trainer.precision")
    if chosen is Precision.auto:
        if device.type == "cuda":
            return Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16
        return Precision.bf16 if cpu_native_bf16() else Precision.fp32
    if chosen is Precision.fp16 and device.type != "cuda":
        raise UserError(
            "trainer.precision=fp16 needs a CUDA GPU (fp16 with a grad scaler); on the CPU use bf16 or fp32"
        )
    return chosen


def precision_choice(requested: Precision | str, device: torch.device) -> str | None:
    """Why ``auto`` chose what it did on a CPU, for the log (None: nothing to say)."""
    if choose(Precision, requested, "trainer.precision") is not Precision.auto:
        return None
    if device.type != "cpu":
        return None
    native = cpu_native_bf16()
    chosen = "bf16" if native else "fp32"
    why = f"native bf16: {native}" if native else "no native bf16 units"
    return f"trainer.precision=auto: {chosen} on this CPU ({why})"


def nhwc_unsafe_convs(model: nn.Module) -> list[str]:
    """The layers oneDNN's NHWC backward mishandles: strided 1x1 convs with < 16 inputs."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and max(m.stride) > 1
        and m.in_channels < NHWC_MIN_CHANNELS
    ]


def pick_channels_last(
    requested: bool, layers: Callable[[], nn.Module], device: torch.device
) -> bool:
    """``trainer.channels_last``, unless the net would train on the CPU with a layer
    whose channels_last backward crashes: then the whole run (net and batches) is
    contiguous, as a batch in channels_last would turn the net's outputs back to it.
    ``layers`` builds the net (weights unneeded) only when that must be looked at."""
    if not requested or device.type != "cpu":
        return requested
    unsafe = nhwc_unsafe_convs(layers())
    if unsafe:
        log.warning(
            "trainer.channels_last=true ignored: on the CPU, %s (a strided 1x1 conv with "
            "fewer than %d input channels) crashes or miscomputes in channels_last backward "
            "(oneDNN); this run trains in the contiguous format",
            unsafe[0] if len(unsafe) == 1 else f"{unsafe[0]} and {len(unsafe) - 1} more",
            NHWC_MIN_CHANNELS,
        )
        return False
    return True


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    if precision is Precision.fp32:
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune the conv kernels once


def allow_tf32(allowed: bool) -> None:
    """``trainer.tf32``: TF32 tensor-core convolutions and matmuls on Ampere and later GPUs
    (10-bit mantissa). Off by default, so fp32 means fp32 (cuDNN's own default is on)."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and plain containers (a checkpoint loads
    with ``weights_only=True``): NumPy's key array becomes a tensor."""
    numpy = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            **numpy,
            "state": {
                **numpy["state"],
                "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            },
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Back to ``state`` (``rng_state``'s, or the older format's NumPy tuple). CUDA states
    go to as many GPUs as both the checkpoint and this machine have; a run moved to or
    from a CPU keeps its CPU generators and seeds no GPU one from them."""
    random.setstate(_python_state(state["python"]))
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        key = numpy["state"]["key"]
        key = key.numpy().astype(np.uint32) if isinstance(key, torch.Tensor) else key
        numpy = {**numpy, "state": {**numpy["state"], "key": key}}
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


def _python_state(state: Any) -> tuple:
    """random.setstate wants tuples; a checkpoint may hold its inner tuple as a list."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class GlobalRNG:
    """Python's, NumPy's and torch's global generators, as one checkpointed owner."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)
