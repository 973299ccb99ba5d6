"""Shortcut paths and the merge of shortcut and branch.

A unit computes ``merge(shortcut(x), branch(x), x)``. The paper's default is
an identity shortcut merged by addition; when a unit changes the map size or
width, the shortcut is either parameter-free zero padding (option A, the
original CIFAR nets) or a strided 1x1 projection (option B, the pre-act
reference code).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def autocast_on() -> bool:
    """Whether a forward pass runs under autocast (GPU or CPU)."""
    return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")


def fp32_like(t: torch.Tensor) -> AbstractContextManager:
    """Autocast off when ``t`` (the identity path) is fp32 under autocast: ops in
    this context (a gate, the classifier) then run in fp32 like the path."""
    if t.dtype == torch.float32 and autocast_on():
        return torch.autocast(t.device.type, enabled=False)
    return nullcontext()


class Merge(nn.Module):
    """Combines the shortcut and the branch; ``x`` is the unit's input (for gates)."""

    def forward(
        self, shortcut: torch.Tensor, branch: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class Add(Merge):
    def forward(
        self, shortcut: torch.Tensor, branch: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        return shortcut + branch


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and append zero channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero_channels={self.extra}"


class Projection(nn.Sequential):
    """Option B: strided 1x1 conv, followed by BN when the branch ends in BN."""

    is_projection = True

    def __init__(self, cin: int, cout: int, stride: int, bn: bool) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride, bias=False)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        super().__init__(*layers)


def downsample_shortcut(kind: str, cin: int, cout: int, stride: int, bn: bool) -> nn.Module:
    """The shortcut of a unit; identity unless the shape changes."""
    if cin == cout and stride == 1:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(cin, cout, stride)
    if kind == "B":
        return Projection(cin, cout, stride, bn)
    raise ValueError(f"unknown downsampling shortcut {kind!r}; expected 'A' or 'B'")
