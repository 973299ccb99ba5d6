"""The shortcut variants of the paper's Fig. 2 / Table 1, as (shortcut, merge) pairs.

A unit computes ``merge(shortcut(x), branch(x), x)`` (see ``units.py``). Each
variant changes one or both of the two modules and leaves the branch alone:

    identity          shortcut: 1 (zero padding or a projection where shapes change)
    scaling           lambda_s * shortcut + lambda_b * branch
    exclusive_gating  (1 - g(x)) * shortcut + g(x) * branch,  g(x) = sigmoid(1x1 conv(x) + b_g)
    shortcut_gating   (1 - g(x)) * shortcut + branch
    conv1x1           a 1x1 convolution on every unit's shortcut
    dropout           dropout(p) on the shortcut (training only) + branch

The gate reads the unit's input ``x`` (not the pre-activation) and must match
the unit's output, so on a downsampling unit its 1x1 convolution is strided
and widens to the output channels, like a projection shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from resnet_exp.errors import UserError
from resnet_exp.models.options import choose
from resnet_exp.models.shortcuts import (
    Add,
    Merge,
    Projection,
    call_at_precision_of,
    downsample_shortcut,
)

torch.fx.wrap(call_at_precision_of)  # a call in the traced graph: it checks autocast per call


class ShortcutName(str, Enum):
    identity = "identity"
    scaling = "scaling"
    exclusive_gating = "exclusive_gating"
    shortcut_gating = "shortcut_gating"
    conv1x1 = "conv1x1"
    dropout = "dropout"

    def __str__(self) -> str:  # run directory names interpolate the name
        return self.value


@dataclass
class ShortcutSpec:
    """A shortcut variant and its parameters (only the variant's own ones are read)."""

    name: ShortcutName = ShortcutName.identity
    shortcut_scale: float = 1.0  # scaling: lambda on the shortcut
    branch_scale: float = 1.0  # scaling: lambda on the branch
    gate_bias: float = -6.0  # exclusive/shortcut gating: initial b_g
    dropout: float = 0.5  # dropout: probability of dropping a shortcut element

    def __post_init__(self) -> None:
        self.name = choose(ShortcutName, self.name, "model.shortcut.name")

    def check(self) -> None:
        if self.name is ShortcutName.dropout and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.shortcut.dropout={self.dropout} must be in [0, 1)")

    def describe(self) -> str:
        """Short text for logs and reports, e.g. ``exclusive_gating(b_g=-6)``."""
        n = self.name
        if n is ShortcutName.scaling:
            return f"scaling({self.shortcut_scale:g}/{self.branch_scale:g})"
        if n in (ShortcutName.exclusive_gating, ShortcutName.shortcut_gating):
            return f"{n.value}(b_g={self.gate_bias:g})"
        if n is ShortcutName.dropout:
            return f"dropout(p={self.dropout:g})"
        return n.value


class Scale(Merge):
    """Constant scaling: ``lambda_s * shortcut + lambda_b * branch``."""

    def __init__(self, shortcut_scale: float, branch_scale: float) -> None:
        super().__init__()
        self.shortcut_scale, self.branch_scale = shortcut_scale, branch_scale

    def forward(
        self, shortcut: torch.Tensor, branch: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        return self.shortcut_scale * shortcut + self.branch_scale * branch

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut_scale:g}, branch={self.branch_scale:g}"


class Gate(Merge):
    """Gating by ``g(x) = sigmoid(conv1x1(x) + b_g)``, one gate per output element.

    ``exclusive``: shortcut x (1 - g), branch x g; otherwise only the shortcut
    is gated and the branch passes unchanged. A very negative b_g starts the
    gate nearly closed (g ~ 0), i.e. close to an identity shortcut.

    The gate runs at the identity path's precision: in fp32 when the unit
    keeps its shortcut in fp32 under autocast (``fp32_identity``). In bf16,
    ``1 - sigmoid(-7)`` rounds to exactly 1.0 (fp32: 0.99909), which would
    erase the gate the paper's Table 1 studies.
    """

    def __init__(self, cin: int, cout: int, stride: int, bias: float, exclusive: bool) -> None:
        super().__init__()
        self.exclusive = exclusive
        self.gate = nn.Conv2d(cin, cout, 1, stride, bias=True)
        nn.init.constant_(self.gate.bias, bias)  # the network's init leaves conv biases alone

    def forward(
        self, shortcut: torch.Tensor, branch: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        # sigmoid runs in its input's dtype under autocast: fp32 here when the path is
        g = torch.sigmoid(call_at_precision_of(shortcut, self.gate, x.to(shortcut.dtype)))
        return (1 - g) * shortcut + (g * branch if self.exclusive else branch)

    def extra_repr(self) -> str:
        return f"exclusive={self.exclusive}"


class DropShortcut(Merge):
    """Dropout on the shortcut only (inverted dropout: identity at evaluation)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(
        self, shortcut: torch.Tensor, branch: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        return self.drop(shortcut) + branch


def unit_shortcut(
    spec: ShortcutSpec, downsample: str, cin: int, cout: int, stride: int, bn: bool
) -> tuple[nn.Module, Merge]:
    """The shortcut module and merge of one unit for a variant.

    ``downsample`` (A or B) and ``bn`` shape the shortcut of units that change
    width or resolution, as for the identity variant.
    """
    n = spec.name
    if n is ShortcutName.conv1x1:
        return Projection(cin, cout, stride, bn), Add()
    shortcut = downsample_shortcut(downsample, cin, cout, stride, bn)
    if n is ShortcutName.identity:
        return shortcut, Add()
    if n is ShortcutName.scaling:
        return shortcut, Scale(spec.shortcut_scale, spec.branch_scale)
    if n in (ShortcutName.exclusive_gating, ShortcutName.shortcut_gating):
        exclusive = n is ShortcutName.exclusive_gating
        return shortcut, Gate(cin, cout, stride, spec.gate_bias, exclusive)
    if n is ShortcutName.dropout:
        return shortcut, DropShortcut(spec.dropout)
    raise AssertionError(n)  # every ShortcutName is handled above
