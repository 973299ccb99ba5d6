from resnet_exp.models.resnet import CifarResNet, build_model, count_params, resolve_unit
from resnet_exp.models.units import ORDERINGS, Ordering, ResidualUnit

__all__ = [
    "ORDERINGS",
    "CifarResNet",
    "Ordering",
    "ResidualUnit",
    "build_model",
    "count_params",
    "resolve_unit",
]
