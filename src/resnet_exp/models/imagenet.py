"""The ImageNet residual networks: 7x7 stem, max-pool, four stages, a linear head.

The same ``ResidualUnit`` as the CIFAR nets, so every ``block`` ordering and
shortcut variant applies. Stage layout as in fb.resnet.torch (``resnet.lua``,
``preresnet.lua``): widths 64/128/256/512 (x4 at a bottleneck's output), the
stride on the 3x3 convolution of a bottleneck, projection shortcuts where the
shape changes. Pre-activation nets follow ``preresnet.lua``: the stem keeps
its BN-ReLU, the first unit skips its own pre-activation, and a BN-ReLU
follows the last unit.
"""

from __future__ import annotations

from torch import nn

from resnet_exp.errors import UserError
from resnet_exp.models.resnet import UNIT_TYPES, CifarResNet
from resnet_exp.models.units import Ordering, ResidualUnit, ops
from resnet_exp.models.variants import ShortcutSpec, unit_shortcut

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
        ordering: Ordering,
        unit: str,
        counts: tuple[int, ...],
        num_classes: int = 1000,
        downsample: str = "auto",
        width: int = 64,
        checkpoint_segments: int = 0,
        shortcut: ShortcutSpec | None = None,
    ) -> None:
        nn.Module.__init__(self)
        spec = shortcut if shortcut is not None else ShortcutSpec()
        utype = UNIT_TYPES[unit]
        if downsample == "auto":
            downsample = "B"  # projections where the shape changes, in both papers
        # Every ordering keeps the stem's BN-ReLU (preresnet.lua does too).
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, padding=3, bias=False),
            *ops("br", width),
            nn.MaxPool2d(3, 2, padding=1),
        )
        units: list[nn.Module] = []
        cin = width
        for stage, n in enumerate(counts):
            widths = utype.widths(width * 2**stage)
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                path, merge = unit_shortcut(
                    spec,
                    downsample,
                    cin,
                    widths[-1],
                    stride,
                    bn=ordering.last.endswith(("cb", "cbr")),
                )
                u = ResidualUnit(ordering, cin, utype.kernels, widths, stride, path, merge)
                if stage == 0 and i == 0 and ordering.is_preact:
                    # preresnet.lua's 'no_preact' first unit: the stem's BN-ReLU
                    # just ran, so both paths read the stem output as it is.
                    u.pre = nn.Sequential()
                units.append(u)
                cin = widths[-1]
        self.units = nn.Sequential(*units)
        self.head = ops(ordering.pre, cin) if ordering.is_preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)  # any test crop (224, 320) pools to 1x1
        self.fc = nn.Linear(cin, num_classes)
        self.checkpoint_segments = checkpoint_segments
        self._init_weights()


def build_imagenet_model(
    ordering: Ordering,
    depth: int,
    num_classes: int = 1000,
    unit: str = "auto",
    downsample: str = "auto",
    width: int = 64,
    checkpoint_segments: int = 0,
    shortcut: ShortcutSpec | None = None,
) -> ImageNetResNet:
    kind, counts = imagenet_unit(depth, unit)
    return ImageNetResNet(
        ordering, kind, counts, num_classes, downsample, width, checkpoint_segments, shortcut
    )
