"""The paper's CIFAR nets: a 3x3 stem conv and three stages on 32/16/8-pixel maps.

A depth counts the stem conv, the units' convs and the classifier, so ``n``
units per stage give 6n+2 layers with basic units, 9n+2 with bottlenecks and
3n+2 with one-conv units.
"""

from __future__ import annotations

from resnet_exp.errors import UserError
from resnet_exp.models.options import Downsample, Unit, choose
from resnet_exp.models.resnet import Stem
from resnet_exp.models.units import UNIT_TYPES

STEM = Stem(3)  # a pre-activation net's first BN-ReLU follows the bare conv
WIDTH = 16  # stages of 16, 32, 64 (x4 at a bottleneck's output)
STAGES = 3
# Depths the paper builds from bottleneck units although 6n+2 would also fit.
BOTTLENECK_DEPTHS = {164, 1001}


def units_per_stage(depth: int, unit: Unit) -> int:
    """n for a depth: 3 stages of n units plus the stem conv and the classifier."""
    per = STAGES * UNIT_TYPES[unit].layers_per_unit
    n, rest = divmod(depth - 2, per)
    if rest or n < 1:
        form = UNIT_TYPES[unit].form
        raise UserError(
            f"depth={depth} does not fit {unit.value} units ({form}, n >= 1); "
            f"nearest valid depths: {_nearest(depth, per)}"
        )
    return n


def _nearest(depth: int, per: int) -> str:
    below = (depth - 2) // per * per + 2
    cands = sorted({d for d in (below, below + per) if d >= per + 2}) or [per + 2]
    return ", ".join(str(d) for d in cands)


def resolve_unit(depth: int, unit: Unit | str = Unit.auto) -> tuple[Unit, int]:
    """Pick the unit type for a depth (basic for 6n+2, bottleneck for 164/1001 and 9n+2)."""
    chosen = choose(Unit, unit, "model.unit")
    if chosen is not Unit.auto:
        return chosen, units_per_stage(depth, chosen)
    if depth in BOTTLENECK_DEPTHS or ((depth - 2) % 6 and not (depth - 2) % 9):
        chosen = Unit.bottleneck
    elif not (depth - 2) % 6:
        chosen = Unit.basic
    else:
        raise UserError(
            f"depth={depth} fits neither basic (6n+2) nor bottleneck (9n+2) units; "
            f"nearest valid depths: {_nearest(depth, 6)} (basic), {_nearest(depth, 9)} (bottleneck)"
        )
    return chosen, units_per_stage(depth, chosen)


def layout(depth: int, unit: Unit | str = Unit.auto) -> tuple[Unit, tuple[int, ...]]:
    """The unit type and units per stage of a CIFAR depth."""
    kind, n = resolve_unit(depth, unit)
    return kind, (n,) * STAGES


def auto_downsample(unit: Unit) -> Downsample:
    """As each unit type was published: projections (B) for bottlenecks, zero padding (A)
    otherwise."""
    return Downsample.B if unit is Unit.bottleneck else Downsample.A
