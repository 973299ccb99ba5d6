"""The ImageNet residual networks: 7x7 stem, max-pool, four stages, a linear head.

The same ``ResidualUnit`` as the CIFAR nets, so every ``block`` ordering and
shortcut variant applies. Stage layout as in fb.resnet.torch (``resnet.lua``,
``preresnet.lua``): widths 64/128/256/512 (x4 at a bottleneck's output),
projection shortcuts where the shape changes. A bottleneck's stride follows
``model.stride_at`` as on CIFAR: the authors' first 1x1 by default (their Caffe
ImageNet models), fb.resnet.torch's 3x3 with ``model.stride_at=conv3x3``.
Pre-activation nets follow ``preresnet.lua``: the stem keeps
its BN-ReLU, the first unit skips its own pre-activation, and a BN-ReLU
follows the last unit.
"""

from __future__ import annotations

from torch import nn

from resnet_exp.errors import UserError
from resnet_exp.models.resnet import DEFAULT_OPTIONS, CifarResNet, NetOptions
from resnet_exp.models.units import BlockSpec, ops
from resnet_exp.models.variants import ShortcutSpec

# depth -> (unit, units per stage); 200 as in fb.resnet.torch
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
FAMILIES = ("cifar", "imagenet")


def imagenet_unit(depth: int, unit: str = "auto") -> tuple[str, tuple[int, ...]]:
    """The unit type and units per stage of an ImageNet depth."""
    if depth not in IMAGENET_DEPTHS:
        allowed = ", ".join(str(d) for d in IMAGENET_DEPTHS)
        raise UserError(f"depth={depth} is not an ImageNet ResNet depth; allowed: {allowed}")
    kind, counts = IMAGENET_DEPTHS[depth]
    if unit not in ("auto", kind):
        raise UserError(
            f"model.unit={unit} does not fit ImageNet ResNet-{depth}, which has {kind} units "
            f"(use model.unit=auto)"
        )
    return kind, counts


def resolve_family(family: str, streamed: bool) -> str:
    """``auto``: ImageNet nets for streamed (ImageNet-sized) images, CIFAR nets otherwise."""
    if family == "auto":
        return "imagenet" if streamed else "cifar"
    if family not in FAMILIES:
        raise UserError(f"model.family={family!r} is not one of auto, {', '.join(FAMILIES)}")
    return family


def family_unit(family: str, depth: int, unit: str = "auto") -> str:
    """The unit type of a net of either family; a bad depth fails here, in one line."""
    from resnet_exp.models.resnet import resolve_unit

    if family == "imagenet":
        return imagenet_unit(depth, unit)[0]
    return resolve_unit(depth, unit)[0]


class ImageNetResNet(CifarResNet):
    """7x7/2 conv stem and 3x3/2 max-pool, four stages on 56/28/14/7-pixel maps
    (at 224 pixels), global average pooling, linear.

    The forward pass, weight initialisation and activation checkpointing are
    the CIFAR net's: only the stem and the stage layout differ.
    """

    def __init__(
        self,
        block: BlockSpec,
        unit: str,
        counts: tuple[int, ...],
        num_classes: int = 1000,
        downsample: str = "auto",
        width: int = 64,
        checkpoint_segments: int = 0,
        shortcut: ShortcutSpec | None = None,
        options: NetOptions = DEFAULT_OPTIONS,
    ) -> None:
        nn.Module.__init__(self)
        if downsample == "auto":
            downsample = "B"  # projections where the shape changes, in both papers
        # Every ordering keeps the stem's BN-ReLU (preresnet.lua does too).
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, padding=3, bias=False),
            *ops("br", width),
            nn.MaxPool2d(3, 2, padding=1),
        )
        self._build_body(
            block,
            unit,
            counts,
            width,
            num_classes,
            downsample,
            checkpoint_segments,
            shortcut,
            options,
        )
        if block.is_preact:
            # preresnet.lua's 'no_preact' first unit: the stem's BN-ReLU just ran,
            # so both paths read the stem output as it is.
            self.units[0].pre = nn.Sequential()


def build_imagenet_model(
    block: BlockSpec,
    depth: int,
    num_classes: int = 1000,
    unit: str = "auto",
    downsample: str = "auto",
    width: int = 64,
    checkpoint_segments: int = 0,
    shortcut: ShortcutSpec | None = None,
    options: NetOptions = DEFAULT_OPTIONS,
) -> ImageNetResNet:
    """``options``: as for the CIFAR nets (``NetOptions``, docs/fidelity.md)."""
    kind, counts = imagenet_unit(depth, unit)
    return ImageNetResNet(
        block,
        kind,
        counts,
        num_classes,
        downsample,
        width,
        checkpoint_segments,
        shortcut,
        options,
    )
