"""The residual networks of the paper: CIFAR (3x3 stem, three stages) and, in imagenet.py,
ImageNet (7x7 stem, four stages); residual units, head and classifier shared."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from resnet_exp.errors import UserError
from resnet_exp.models.ghost_bn import BN_STATS, convert_ghost_bn
from resnet_exp.models.shortcuts import autocast_on, fp32_like
from resnet_exp.models.units import BLOCKS, STRIDE_AT, BlockSpec, ResidualUnit, conv, ops
from resnet_exp.models.variants import ShortcutSpec, unit_shortcut

PREACT_SHORTCUTS = ("shared", "raw")


@dataclass(frozen=True)
class UnitType:
    kernels: tuple[int, ...]  # the branch's convolutions
    expansion: int  # output width / inner width
    form: str  # how the depth counts layers

    @property
    def layers_per_unit(self) -> int:
        return len(self.kernels)

    def widths(self, inner: int) -> tuple[int, ...]:
        return (inner,) * (len(self.kernels) - 1) + (inner * self.expansion,)


UNIT_TYPES = {
    "basic": UnitType((3, 3), 1, "6n+2"),
    "bottleneck": UnitType((1, 3, 1), 4, "9n+2"),
    "single": UnitType((3,), 1, "3n+2"),  # the paper's "1-layer skip" ResNet-110
}
# Depths the paper builds from bottleneck units although 6n+2 would also fit.
BOTTLENECK_DEPTHS = {164, 1001}


@dataclass(frozen=True)
class NetOptions:
    """Where the paper and the authors' code leave a choice (docs/fidelity.md); the
    defaults follow the authors' code. The same for both families.

    ``stride_at``: see ``ResidualUnit``. ``preact_shortcut``: in a pre-activation
    net, a shortcut that changes the shape (zero padding or projection, on the
    first unit of a stage) reads the unit's shared pre-activation (``shared``:
    fb.resnet.torch's ``both_preact``, resnet-pre-act.lua's "common BN, ReLU") or
    its raw input (``raw``). ``bn_group``: batch norm statistics per group of that
    many images of a training batch (``ghost_bn.py``; None: the whole batch),
    ``bn_stats`` which running statistics are kept. ``fp32_identity``: under
    autocast the identity path (stem output, every sum), the gates and scalings
    and the classifier run in fp32; the convolutions in the autocast dtype.
    """

    stride_at: str = "first"
    preact_shortcut: str = "shared"
    bn_group: int | None = None
    bn_stats: str = "first"
    fp32_identity: bool = True

    def check(self) -> None:
        for key, allowed in (
            ("stride_at", STRIDE_AT),
            ("preact_shortcut", PREACT_SHORTCUTS),
            ("bn_stats", BN_STATS),
        ):
            if getattr(self, key) not in allowed:
                raise UserError(
                    f"model.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}"
                )
        if self.bn_group is not None and self.bn_group < 1:
            raise UserError(
                f"model.bn_group={self.bn_group} must be at least 1 (or null: the whole batch)"
            )


DEFAULT_OPTIONS = NetOptions()


def units_per_stage(depth: int, unit: str) -> int:
    """n for a depth: 3 stages of n units plus the stem conv and the classifier."""
    per = 3 * UNIT_TYPES[unit].layers_per_unit
    n, rest = divmod(depth - 2, per)
    if rest or n < 1:
        form = UNIT_TYPES[unit].form
        raise UserError(
            f"depth={depth} does not fit {unit} units ({form}, n >= 1); "
            f"nearest valid depths: {_nearest(depth, per)}"
        )
    return n


def _nearest(depth: int, per: int) -> str:
    below = (depth - 2) // per * per + 2
    cands = sorted({d for d in (below, below + per) if d >= per + 2}) or [per + 2]
    return ", ".join(str(d) for d in cands)


def resolve_unit(depth: int, unit: str = "auto") -> tuple[str, int]:
    """Pick the unit type for a depth (basic for 6n+2, bottleneck for 164/1001 and 9n+2)."""
    if unit != "auto":
        if unit not in UNIT_TYPES:
            raise UserError(f"model.unit={unit!r} is not one of auto, {', '.join(UNIT_TYPES)}")
        return unit, units_per_stage(depth, unit)
    if depth in BOTTLENECK_DEPTHS or ((depth - 2) % 6 and not (depth - 2) % 9):
        unit = "bottleneck"
    elif not (depth - 2) % 6:
        unit = "basic"
    else:
        raise UserError(
            f"depth={depth} fits neither basic (6n+2) nor bottleneck (9n+2) units; "
            f"nearest valid depths: {_nearest(depth, 6)} (basic), {_nearest(depth, 9)} (bottleneck)"
        )
    return unit, units_per_stage(depth, unit)


class CifarResNet(nn.Module):
    """Stem conv, three stages of residual units on 32/16/8-pixel maps, pool, linear.

    Post-activation nets normalise and activate the stem output. Pre-activation
    nets leave the stem conv bare: the first unit's BN-ReLU follows it directly
    and feeds both paths, and one more BN-ReLU after the last unit precedes the
    pooling (without it training can diverge).

    ``options``: the choices of ``NetOptions`` (docs/fidelity.md).
    """

    def __init__(
        self,
        block: BlockSpec,
        unit: str,
        n: int,
        num_classes: int = 10,
        downsample: str = "auto",
        width: int = 16,
        checkpoint_segments: int = 0,
        shortcut: ShortcutSpec | None = None,
        options: NetOptions = DEFAULT_OPTIONS,
    ) -> None:
        super().__init__()
        if downsample == "auto":  # as each unit type was published
            downsample = "B" if unit == "bottleneck" else "A"
        self.stem = nn.Sequential(conv(3, width, 3), *([] if block.is_preact else ops("br", width)))
        self._build_body(
            block,
            unit,
            (n, n, n),
            width,
            num_classes,
            downsample,
            checkpoint_segments,
            shortcut,
            options,
        )

    def _build_body(
        self,
        block: BlockSpec,
        unit: str,
        counts: tuple[int, ...],
        width: int,
        num_classes: int,
        downsample: str,
        checkpoint_segments: int,
        shortcut: ShortcutSpec | None,
        options: NetOptions,
    ) -> None:
        """Stages of ``counts`` units (widths double, the first unit of every stage
        but the first halves the map), the head, the classifier; both families."""
        spec = shortcut if shortcut is not None else ShortcutSpec()
        utype = UNIT_TYPES[unit]
        units: list[nn.Module] = []
        cin = width
        for stage, n in enumerate(counts):
            widths = utype.widths(width * 2**stage)
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                # A projection is followed by BN when the branch's last conv is.
                path, merge = unit_shortcut(
                    spec,
                    downsample,
                    cin,
                    widths[-1],
                    stride,
                    bn=block.last.endswith(("cb", "cbr")),
                )
                first = stage == 0 and i == 0
                # The first unit's BN-ReLU follows the stem conv directly, so
                # its shortcut always reads it; shortcuts that change the
                # shape (and 1x1-conv shortcuts) follow `preact_shortcut`.
                reshapes = stride > 1 or cin != widths[-1]
                reads_pre = reshapes or getattr(path, "is_projection", False)
                shared = options.preact_shortcut == "shared"
                share = block.is_preact and (first or (shared and reads_pre))
                units.append(
                    ResidualUnit(
                        block,
                        cin,
                        utype.kernels,
                        widths,
                        stride,
                        path,
                        merge,
                        share_preact=share,
                        stride_at=options.stride_at,
                        fp32_identity=options.fp32_identity,
                    )
                )
                cin = widths[-1]
        self.units = nn.Sequential(*units)
        self.head = ops(block.pre, cin) if block.is_preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size (ImageNet's 224 and 320 crops)
        self.fc = nn.Linear(cin, num_classes)
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
        if self.fp32_identity and autocast_on():
            x = x.float()  # the identity path starts fp32; every unit keeps it so
        if self.checkpoint_segments and self.training and torch.is_grad_enabled():
            x = self._checkpointed_units(x)
        else:
            x = self.units(x)
        x = self.pool(self.head(x)).flatten(1)
        with fp32_like(x):  # fp32 logits for the loss and the evaluation
            return self.fc(x)

    def _checkpointed_units(self, x: torch.Tensor) -> torch.Tensor:
        """Keep only the segment boundaries; backward recomputes each segment.

        The recomputation must not update BN running statistics a second time.
        """
        size = math.ceil(len(self.units) / self.checkpoint_segments)
        for start in range(0, len(self.units), size):
            segment = self.units[start : start + size]
            x = checkpoint(
                segment,
                x,
                use_reentrant=False,
                context_fn=partial(_recompute_contexts, segment),
            )
        return x


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


def build_model(
    block: str = "preact",
    depth: int = 110,
    num_classes: int = 10,
    unit: str = "auto",
    downsample: str = "auto",
    width: int | None = None,
    checkpoint_segments: int = 0,
    *,
    shortcut: str | ShortcutSpec = "identity",
    family: str = "cifar",
    stride_at: str = "first",
    preact_shortcut: str = "shared",
    bn_group: int | None = None,
    bn_stats: str = "first",
    fp32_identity: bool = True,
) -> CifarResNet:
    """Build a ResNet of the paper, e.g. ``build_model("preact", 1001)``.

    ``family`` is ``cifar`` (3x3 stem, three stages; ``width`` 16 by
    default) or ``imagenet`` (7x7 stem and max-pool, four stages, depths 18,
    34, 50, 101, 152, 200; ``width`` 64), e.g.
    ``build_model("preact", 200, 1000, family="imagenet")``.

    ``block`` is the unit ordering (``original``, ``bn_after_add``,
    ``relu_before_add``, ``relu_only_preact``, ``preact``); ``unit`` is
    ``basic`` (6n+2), ``bottleneck`` (9n+2), ``single`` (3n+2, one conv per
    unit) or ``auto``; ``downsample`` is ``A`` (zero padding), ``B``
    (projection) or ``auto`` (A for basic, B for bottleneck units).
    ``shortcut`` is a variant of Fig. 2 by name (``identity``, ``scaling``,
    ``exclusive_gating``, ``shortcut_gating``, ``conv1x1``, ``dropout``) or a
    ``ShortcutSpec`` with its parameters, e.g.
    ``ShortcutSpec("exclusive_gating", gate_bias=-7)``. The remaining
    options (``stride_at``, ``preact_shortcut``, ``bn_group``, ``bn_stats``,
    ``fp32_identity``) are described in ``NetOptions``; their defaults
    follow the authors' code (see docs/fidelity.md).
    """
    if block not in BLOCKS:
        raise UserError(f"block={block!r} is not one of {', '.join(BLOCKS)}")
    if downsample not in ("auto", "A", "B"):
        raise UserError(f"model.downsample={downsample!r} is not one of auto, A, B")
    options = NetOptions(stride_at, preact_shortcut, bn_group, bn_stats, fp32_identity)
    options.check()
    spec = ShortcutSpec(shortcut) if isinstance(shortcut, str) else shortcut
    spec.check()
    if width is None:  # the family's stem width
        width = 64 if family == "imagenet" else 16
    if family == "imagenet":
        from resnet_exp.models.imagenet import build_imagenet_model

        return build_imagenet_model(
            BLOCKS[block],
            depth,
            num_classes,
            unit,
            downsample,
            width,
            checkpoint_segments,
            spec,
            options,
        )
    if family != "cifar":
        raise UserError(f"model.family={family!r} is not one of auto, cifar, imagenet")
    unit, n = resolve_unit(depth, unit)
    return CifarResNet(
        BLOCKS[block],
        unit,
        n,
        num_classes,
        downsample,
        width,
        checkpoint_segments,
        spec,
        options,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
