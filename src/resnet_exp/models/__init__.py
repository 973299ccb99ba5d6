from resnet_exp.models.resnet import CifarResNet, build_model, count_params, resolve_unit
from resnet_exp.models.units import ORDERINGS, Ordering, ResidualUnit
from resnet_exp.models.variants import ShortcutName, ShortcutSpec

__all__ = [
    "ORDERINGS",
    "CifarResNet",
    "Ordering",
    "ResidualUnit",
    "ShortcutName",
    "ShortcutSpec",
    "build_model",
    "count_params",
    "resolve_unit",
]
