"""Residual units: the five orderings of the paper's Fig. 4, written as data.

A block (the paper: a unit ordering) is the row of operations the figure draws around one addition:
``c`` convolution, ``b`` batch norm, ``r`` ReLU. Each block gives the ops
around every convolution of the branch but the last, around the last one,
and after the addition. A basic unit (two 3x3 convs), a bottleneck unit
(1x1, 3x3, 1x1) and a one-conv unit all follow from the same three strings:

    original (a), basic:       c b r  c b       (+x)  r
    preact (e), bottleneck:    b r c  b r c  b r c  (+x)

Ops in front of the first convolution form the unit's *pre-activation*. When
the shortcut changes the shape (a projection or zero padding) it reads the
pre-activated input, so the BN-ReLU is computed once and shared (the authors'
code: resnet-pre-act.lua's "common BN, ReLU", fb.resnet.torch's
``both_preact``); an identity shortcut always carries the untouched ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resnet_exp.models.options import Block, StrideAt, Unit, choose
from resnet_exp.models.shortcuts import Add, Merge, float_under_autocast

torch.fx.wrap(float_under_autocast)  # a call in the traced graph, as it checks autocast per call


@dataclass(frozen=True)
class BlockSpec:
    each: str  # ops around every conv of the branch except the last
    last: str  # ops around the last conv of the branch
    after_add: str  # ops applied to the sum

    def branch(self, convs: int) -> list[str]:
        return [self.each] * (convs - 1) + [self.last]

    @property
    def pre(self) -> str:
        """Ops before the first conv: the unit's pre-activation."""
        return self.each[: self.each.index("c")]

    @property
    def is_preact(self) -> bool:
        return bool(self.pre)


BLOCKS: dict[str, BlockSpec] = {
    #                           each conv,  last conv,  after the addition
    Block.original: BlockSpec("cbr", "cb", "r"),  # (a) conv-BN-ReLU-conv-BN, add, ReLU
    Block.bn_after_add: BlockSpec("cbr", "c", "br"),  # (b) ... conv, add, BN-ReLU
    Block.relu_before_add: BlockSpec("cbr", "cbr", ""),  # (c) ... conv-BN-ReLU, add
    Block.relu_only_preact: BlockSpec("rcb", "rcb", ""),  # (d) ReLU-conv-BN ..., add
    Block.preact: BlockSpec("brc", "brc", ""),  # (e) BN-ReLU-conv ..., add
}


@dataclass(frozen=True)
class UnitType:
    kernels: tuple[int, ...]  # the branch's convolutions
    expansion: int  # output width / inner width
    form: str  # how a CIFAR depth counts layers

    @property
    def layers_per_unit(self) -> int:
        return len(self.kernels)

    def widths(self, inner: int) -> tuple[int, ...]:
        return (inner,) * (len(self.kernels) - 1) + (inner * self.expansion,)


UNIT_TYPES = {
    Unit.basic: UnitType((3, 3), 1, "6n+2"),
    Unit.bottleneck: UnitType((1, 3, 1), 4, "9n+2"),
    Unit.single: UnitType((3,), 1, "3n+2"),  # the paper's "1-layer skip" ResNet-110
}


def ops(spec: str, channels: int, inplace: bool = True) -> nn.Sequential:
    """Batch norms and ReLUs for a run of ``b``/``r`` letters (no convs)."""
    layers: list[nn.Module] = []
    for i, op in enumerate(spec):
        if op == "b":
            layers.append(nn.BatchNorm2d(channels))
        elif op == "r":
            # A ReLU that reads the unit's input must not overwrite it: the
            # identity shortcut still needs it.
            layers.append(nn.ReLU(inplace=inplace or i > 0))
        else:
            raise ValueError(f"unexpected op {op!r} in {spec!r}")
    return nn.Sequential(*layers)


def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)


class ResidualUnit(nn.Module):
    """One residual unit: ``post(merge(shortcut(x), branch(pre(x))))``.

    ``kernels`` gives the branch's convolutions (``(3, 3)`` basic,
    ``(1, 3, 1)`` bottleneck, ``(3,)`` one-layer skip); ``widths`` their
    output channels. ``stride_at="first"`` puts a downsampling unit's stride
    on its first conv: the first 1x1 of a bottleneck, as in the authors' code
    (resnet-pre-act.lua) and their Caffe models; ``"conv3x3"`` puts it on the
    first 3x3 conv, as fb.resnet.torch does. Basic and one-conv units start
    with their 3x3, so both place it there.

    ``fp32_identity``: under autocast the shortcut is cast to fp32 before the
    merge, so the sum (the identity path) stays fp32 while the convolutions
    run in bf16/fp16. Outside autocast it does nothing. ``skip_pre``: the unit
    has no pre-activation of its own, its input is already activated (the
    first unit of an ImageNet pre-activation net, after the stem's BN-ReLU).
    """

    def __init__(
        self,
        block: BlockSpec,
        cin: int,
        kernels: tuple[int, ...],
        widths: tuple[int, ...],
        stride: int,
        shortcut: nn.Module,
        merge: Merge | None = None,
        share_preact: bool = False,
        stride_at: StrideAt | str = StrideAt.first,
        fp32_identity: bool = True,
        skip_pre: bool = False,
    ) -> None:
        super().__init__()
        stride_at = choose(StrideAt, stride_at, "model.stride_at")
        pre = block.pre
        # The unit's input is only overwritten in place where no identity
        # path reads it afterwards.
        self.pre = ops("" if skip_pre else pre, cin, inplace=False)
        layers: list[nn.Module] = []
        channels = cin
        strided = (
            0 if stride_at is StrideAt.first else next(i for i, k in enumerate(kernels) if k == 3)
        )
        for i, (spec, k, width) in enumerate(zip(block.branch(len(kernels)), kernels, widths)):
            if i == 0:
                spec = spec[len(pre) :]  # the pre-activation already ran
            before, after = spec.split("c")
            layers += ops(before, channels)
            layers.append(conv(channels, width, k, stride if i == strided else 1))
            channels = width
            layers += ops(after, channels)
        self.branch = nn.Sequential(*layers)
        self.shortcut = shortcut
        self.merge = merge if merge is not None else Add()
        self.post = ops(block.after_add, channels)
        # Whether the shortcut reads the pre-activated input (computed once);
        # the network decides (see resnet.py).
        self.share_preact = share_preact
        self.fp32_identity = fp32_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x)
        identity = self.shortcut(pre if self.share_preact else x)
        if self.fp32_identity:
            identity = float_under_autocast(identity)  # the merge then adds (and gates) in fp32
        return self.post(self.merge(identity, self.branch(pre), x))
