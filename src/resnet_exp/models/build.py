"""``build_model``: a net of either family from its names (block, depth, options).

A family is a stem, a default width and a table of depths (``cifar.py``,
``imagenet.py``); the net itself is one class (``resnet.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from resnet_exp.errors import UserError
from resnet_exp.models import cifar, imagenet
from resnet_exp.models.options import Block, Downsample, Family, NetOptions, Unit, choose
from resnet_exp.models.resnet import ResNet, Stem
from resnet_exp.models.units import BLOCKS
from resnet_exp.models.variants import ShortcutSpec


@dataclass(frozen=True)
class FamilySpec:
    stem: Stem
    width: int  # the stem's width; every stage doubles it
    layout: Callable[[int, Unit | str], tuple[Unit, tuple[int, ...]]]  # depth, unit -> unit, counts
    auto_downsample: Callable[[Unit], Downsample]  # unit -> shortcut of reshaping units


FAMILIES = {
    Family.cifar: FamilySpec(cifar.STEM, cifar.WIDTH, cifar.layout, cifar.auto_downsample),
    Family.imagenet: FamilySpec(
        imagenet.STEM, imagenet.WIDTH, imagenet.layout, imagenet.auto_downsample
    ),
}


def resolve_family(family: Family | str, streamed: bool) -> Family:
    """``auto``: ImageNet nets for streamed (ImageNet-sized) images, CIFAR nets otherwise."""
    chosen = choose(Family, family, "model.family")
    if chosen is Family.auto:
        chosen = Family.imagenet if streamed else Family.cifar
    return chosen


@dataclass(frozen=True)
class NetSpec:
    """A net with every choice made (no ``auto`` left): what ``build`` makes.

    ``NetSpec.of`` resolves and checks the names once (a bad depth, unit, option or
    shortcut is a one-line UserError); everything below takes the enums as they are.
    """

    block: Block
    depth: int
    family: Family  # cifar | imagenet
    unit: Unit  # basic | bottleneck | single
    counts: tuple[int, ...]  # units per stage
    downsample: Downsample  # A | B: the shortcut of units that change the shape
    width: int  # the stem's width; every stage doubles it
    checkpointing: int = 0  # activation-checkpoint segments (0: off)
    shortcut: ShortcutSpec = field(default_factory=ShortcutSpec)
    options: NetOptions = field(default_factory=NetOptions)

    @classmethod
    def of(
        cls,
        block: Block | str = Block.preact,
        depth: int = 110,
        *,
        family: Family | str = Family.cifar,
        unit: Unit | str = Unit.auto,
        downsample: Downsample | str = Downsample.auto,
        width: int | None = None,
        checkpointing: int = 0,
        shortcut: str | ShortcutSpec = "identity",
        streamed: bool = False,
        **options: Any,
    ) -> NetSpec:
        """The net these names describe; ``streamed``: the data is ImageNet-sized
        (``family=auto`` then means ImageNet nets)."""
        chosen_family = resolve_family(family, streamed)
        fam = FAMILIES[chosen_family]
        kind, counts = fam.layout(depth, unit)  # a bad depth fails first
        chosen = choose(Downsample, downsample, "model.downsample")
        short = ShortcutSpec(shortcut) if isinstance(shortcut, str) else shortcut
        short.check()
        if width is not None and width < 1:
            raise UserError(f"model.width={width} must be at least 1")
        return cls(
            block=choose(Block, block, "block"),
            depth=depth,
            family=chosen_family,
            unit=kind,
            counts=counts,
            downsample=fam.auto_downsample(kind) if chosen is Downsample.auto else chosen,
            width=fam.width if width is None else width,
            checkpointing=checkpointing,
            shortcut=short,
            options=NetOptions.of(**options),
        )

    @classmethod
    def from_config(cls, model: Any, depth: int, streamed: bool) -> NetSpec:
        """The net a config's ``model`` section and ``depth`` describe."""
        return cls.of(
            model.block,
            depth,
            family=model.family,
            unit=model.unit,
            downsample=model.downsample,
            width=model.width,
            checkpointing=model.checkpointing,
            shortcut=model.shortcut,
            streamed=streamed,
            **{f.name: getattr(model, f.name) for f in fields(NetOptions)},
        )

    def build(self, num_classes: int) -> ResNet:
        widths = tuple(self.width * 2**stage for stage in range(len(self.counts)))
        fam = FAMILIES[self.family]
        return ResNet(
            BLOCKS[self.block],
            self.unit,
            fam.stem,
            widths,
            self.counts,
            num_classes,
            self.downsample,
            self.shortcut,
            self.options,
            self.checkpointing,
        )

    def layers(self) -> ResNet:
        """The net's layers on the meta device (no memory, no weights): to look at."""
        with torch.device("meta"):
            return self.build(num_classes=1)

    @property
    def name(self) -> str:
        """E.g. ``preact ResNet-164 (bottleneck units)``."""
        return f"{self.block.value} ResNet-{self.depth} ({self.unit.value} units)"


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
    **options: Any,
) -> ResNet:
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
    ``ShortcutSpec("exclusive_gating", gate_bias=-7)``. ``options`` are the
    fields of ``NetOptions`` (``stride_at``, ``preact_shortcut``, ``bn_group``,
    ``bn_stats``, ``fp32_identity``); their defaults follow the authors' code
    (see docs/fidelity.md).
    """
    spec = NetSpec.of(
        block,
        depth,
        family=family,
        unit=unit,
        downsample=downsample,
        width=width,
        checkpointing=checkpoint_segments,
        shortcut=shortcut,
        **options,
    )
    return spec.build(num_classes)
