"""The residual network: a stem, stages of residual units, a head and a classifier.

One class for both families; what differs (the stem, the stage layout, the
default width) is data in ``cifar.py`` and ``imagenet.py``, put together in
``build.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from resnet_exp.models.ghost_bn import convert_ghost_bn
from resnet_exp.models.options import Downsample, NetOptions, PreactShortcut, Unit
from resnet_exp.models.shortcuts import call_at_precision_of, float_under_autocast
from resnet_exp.models.units import UNIT_TYPES, BlockSpec, ResidualUnit, conv, ops
from resnet_exp.models.variants import ShortcutSpec, unit_shortcut

# Calls in a traced graph: they check autocast (or grad mode) each time they run.
torch.fx.wrap(call_at_precision_of)
torch.fx.wrap(float_under_autocast)


@dataclass(frozen=True)
class Stem:
    """The layers before the first unit: a conv of ``kernel`` x ``kernel`` and
    ``stride``, then BN-ReLU, then (``pool``) a 3x3/2 max-pool.

    ``bn_relu``: every ordering keeps the stem's BN-ReLU (preresnet.lua's
    ImageNet nets), so a pre-activation net's first unit skips its own. Else
    only post-activation nets have it: a pre-activation net's first BN-ReLU
    follows the bare conv (the paper's CIFAR nets).
    """

    kernel: int
    stride: int = 1
    pool: bool = False
    bn_relu: bool = False

    def build(self, block: BlockSpec, width: int) -> nn.Sequential:
        layers: list[nn.Module] = [conv(3, width, self.kernel, self.stride)]
        if self.bn_relu or not block.is_preact:
            layers += ops("br", width)
        if self.pool:
            layers.append(nn.MaxPool2d(3, 2, padding=1))
        return nn.Sequential(*layers)


class ResNet(nn.Module):
    """``stem``, stages of ``counts`` units at inner widths ``widths`` (the first
    unit of every stage but the first halves the map), the head, global average
    pooling, a linear classifier.

    A pre-activation net ends in one more BN-ReLU (the head) before the pooling
    (without it training can diverge). ``downsample``: the shortcut (A or B) of
    units that change the shape. ``options``: the choices of ``NetOptions``
    (docs/fidelity.md).
    """

    def __init__(
        self,
        block: BlockSpec,
        unit: Unit,
        stem: Stem,
        widths: tuple[int, ...],
        counts: tuple[int, ...],
        num_classes: int,
        downsample: Downsample,
        shortcut: ShortcutSpec | None = None,
        options: NetOptions | None = None,
        checkpoint_segments: int = 0,
    ) -> None:
        super().__init__()
        options = options if options is not None else NetOptions()
        self.stem = stem.build(block, widths[0])
        units = _units(block, unit, stem, widths, counts, downsample, shortcut, options)
        self.units = nn.Sequential(*units)
        cout = UNIT_TYPES[unit].widths(widths[-1])[-1]
        self.head = ops(block.pre, cout) if block.is_preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size (ImageNet's 224 and 320 crops)
        self.fc = nn.Linear(cout, num_classes)
        self.checkpoint_segments = checkpoint_segments
        self.fp32_identity = options.fp32_identity
        self._init_weights()
        if options.bn_group is not None:
            convert_ghost_bn(self, options.bn_group, options.bn_stats)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al. (MSRA) initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.fp32_identity:
            x = float_under_autocast(x)  # the identity path starts fp32; every unit keeps it so
        if self.checkpoint_segments:
            x = checkpointed_units(self.units, x, self.checkpoint_segments)
        else:
            x = self.units(x)
        x = self.pool(self.head(x)).flatten(1)
        return call_at_precision_of(x, self.fc, x)  # fp32 logits for the loss and evaluation


def _units(
    block: BlockSpec,
    unit: Unit,
    stem: Stem,
    widths: tuple[int, ...],
    counts: tuple[int, ...],
    downsample: Downsample,
    shortcut: ShortcutSpec | None,
    options: NetOptions,
) -> list[ResidualUnit]:
    """The residual units of every stage, in order."""
    spec = shortcut if shortcut is not None else ShortcutSpec()
    utype = UNIT_TYPES[unit]
    units: list[ResidualUnit] = []
    cin = widths[0]
    for stage, (inner, n) in enumerate(zip(widths, counts)):
        out = utype.widths(inner)
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            # A projection is followed by BN when the branch's last conv is.
            bn = block.last.endswith(("cb", "cbr"))
            path, merge = unit_shortcut(spec, downsample.value, cin, out[-1], stride, bn)
            first = not units
            # The first unit's BN-ReLU follows the stem conv directly, so its
            # shortcut always reads it; shortcuts that change the shape (and
            # 1x1-conv shortcuts) follow `preact_shortcut`.
            reshapes = stride > 1 or cin != out[-1]
            reads_pre = reshapes or getattr(path, "is_projection", False)
            shared = options.preact_shortcut is PreactShortcut.shared
            unit_ = ResidualUnit(
                block,
                cin,
                utype.kernels,
                out,
                stride,
                path,
                merge,
                share_preact=block.is_preact and (first or (shared and reads_pre)),
                stride_at=options.stride_at,
                fp32_identity=options.fp32_identity,
                # preresnet.lua's 'no_preact' first unit: the stem's BN-ReLU just ran.
                skip_pre=first and stem.bn_relu,
            )
            units.append(unit_)
            cin = out[-1]
    return units


def checkpointed_units(units: nn.Sequential, x: torch.Tensor, segments: int) -> torch.Tensor:
    """``units(x)``; in training with gradients, keep only the boundaries of
    ``segments`` segments and let backward recompute each one.

    The recomputation must not update BN running statistics a second time.
    """
    if not (units.training and torch.is_grad_enabled()):
        return units(x)
    size = math.ceil(len(units) / segments)
    for start in range(0, len(units), size):
        segment = units[start : start + size]
        x = checkpoint(
            segment,
            x,
            use_reentrant=False,
            context_fn=partial(_recompute_contexts, segment),
        )
    return x


torch.fx.wrap(checkpointed_units)  # training mode and grad mode are read per call


@contextmanager
def _frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = 1 * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum


def _recompute_contexts(segment: nn.Module):  # (forward context, recompute context)
    return nullcontext(), _frozen_bn_stats(segment)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
