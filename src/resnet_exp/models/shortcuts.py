"""Shortcut paths and the merge of shortcut and branch.

A unit computes ``merge(shortcut(x), branch(x), x)``. The paper's default is
an identity shortcut merged by addition; when a unit changes the map size or
width, the shortcut is either parameter-free zero padding (option A, the
original CIFAR nets) or a strided 1x1 projection (option B, the pre-act
reference code).

The fp32 identity path under autocast is kept by two functions that look at
the autocast state (and a tensor's dtype) when they run. ``torch.fx`` cannot
trace such a branch, so the modules that call them register them with
``torch.fx.wrap``: a traced net calls them as they are, at run time, and
behaves as the eager net under autocast and without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def autocast_on() -> bool:
    """Whether a forward pass runs under autocast (GPU or CPU)."""
    return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")


def float_under_autocast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 under autocast (the identity path), as it is otherwise."""
    return x.float() if autocast_on() else x


def call_at_precision_of(ref: torch.Tensor, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with autocast off when ``ref`` (the identity path) is fp32 under
    autocast: a gate or the classifier then runs in fp32 like the path."""
    if ref.dtype == torch.float32 and autocast_on():
        with torch.autocast(ref.device.type, enabled=False):
            return module(x)
    return module(x)


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
