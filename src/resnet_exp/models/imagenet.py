"""The ImageNet nets: 7x7/2 stem and 3x3/2 max-pool, four stages on 56/28/14/7-pixel
maps (at 224 pixels).

Stage layout as in fb.resnet.torch (``resnet.lua``, ``preresnet.lua``): widths
64/128/256/512 (x4 at a bottleneck's output), projection shortcuts where the
shape changes. A bottleneck's stride follows ``model.stride_at`` as on CIFAR:
the authors' first 1x1 by default (their Caffe ImageNet models),
fb.resnet.torch's 3x3 with ``model.stride_at=conv3x3``. Pre-activation nets
follow ``preresnet.lua``: the stem keeps its BN-ReLU, the first unit skips its
own pre-activation, and a BN-ReLU follows the last unit.
"""

from __future__ import annotations

from resnet_exp.errors import UserError
from resnet_exp.models.options import Downsample, Unit, choose
from resnet_exp.models.resnet import Stem

STEM = Stem(7, stride=2, pool=True, bn_relu=True)  # every ordering keeps the BN-ReLU
WIDTH = 64
# depth -> (unit, units per stage); 200 as in fb.resnet.torch
IMAGENET_DEPTHS: dict[int, tuple[Unit, tuple[int, int, int, int]]] = {
    18: (Unit.basic, (2, 2, 2, 2)),
    34: (Unit.basic, (3, 4, 6, 3)),
    50: (Unit.bottleneck, (3, 4, 6, 3)),
    101: (Unit.bottleneck, (3, 4, 23, 3)),
    152: (Unit.bottleneck, (3, 8, 36, 3)),
    200: (Unit.bottleneck, (3, 24, 36, 3)),
}


def layout(depth: int, unit: Unit | str = Unit.auto) -> tuple[Unit, tuple[int, ...]]:
    """The unit type and units per stage of an ImageNet depth."""
    if depth not in IMAGENET_DEPTHS:
        allowed = ", ".join(str(d) for d in IMAGENET_DEPTHS)
        raise UserError(f"depth={depth} is not an ImageNet ResNet depth; allowed: {allowed}")
    kind, counts = IMAGENET_DEPTHS[depth]
    chosen = choose(Unit, unit, "model.unit")
    if chosen not in (Unit.auto, kind):
        raise UserError(
            f"model.unit={chosen.value} does not fit ImageNet ResNet-{depth}, which has "
            f"{kind.value} units (use model.unit=auto)"
        )
    return kind, counts


def auto_downsample(unit: Unit) -> Downsample:
    """Projections where the shape changes, in both papers."""
    return Downsample.B
