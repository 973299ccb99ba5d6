"""``build_model``: a net of either family from its names (block, depth, options).

A family is a stem, a default width and a table of depths (``cifar.py``,
``imagenet.py``); the net itself is one class (``resnet.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resnet_exp.models import cifar, imagenet
from resnet_exp.models.options import Block, Downsample, Family, NetOptions, choose
from resnet_exp.models.resnet import ResNet, Stem
from resnet_exp.models.units import BLOCKS
from resnet_exp.models.variants import ShortcutSpec


@dataclass(frozen=True)
class FamilySpec:
    stem: Stem
    width: int  # the stem's width; every stage doubles it
    layout: Callable[[int, str], tuple[str, tuple[int, ...]]]  # depth, unit -> unit, counts
    auto_downsample: Callable[[str], Downsample]  # unit -> shortcut of reshaping units


FAMILIES = {
    Family.cifar: FamilySpec(cifar.STEM, cifar.WIDTH, cifar.layout, cifar.auto_downsample),
    Family.imagenet: FamilySpec(
        imagenet.STEM, imagenet.WIDTH, imagenet.layout, imagenet.auto_downsample
    ),
}


def resolve_family(family: Family | str, streamed: bool) -> str:
    """``auto``: ImageNet nets for streamed (ImageNet-sized) images, CIFAR nets otherwise."""
    chosen = choose(Family, family, "model.family")
    if chosen is Family.auto:
        chosen = Family.imagenet if streamed else Family.cifar
    return chosen.value


def family_unit(family: Family | str, depth: int, unit: str = "auto") -> str:
    """The unit type of a net of either family; a bad depth fails here, in one line."""
    return FAMILIES[choose(Family, family, "model.family")].layout(depth, unit)[0]


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
    spec = BLOCKS[choose(Block, block, "block")]
    chosen = choose(Downsample, downsample, "model.downsample")
    opts = NetOptions.of(**options)
    short = ShortcutSpec(shortcut) if isinstance(shortcut, str) else shortcut
    short.check()
    fam = FAMILIES[Family(resolve_family(family, streamed=False))]
    kind, counts = fam.layout(depth, unit)
    if chosen is Downsample.auto:
        chosen = fam.auto_downsample(kind)
    stem_width = fam.width if width is None else width
    widths = tuple(stem_width * 2**stage for stage in range(len(counts)))
    return ResNet(
        spec, kind, fam.stem, widths, counts, num_classes, chosen, short, opts, checkpoint_segments
    )
