from resnet_exp.models.resnet import CifarResNet, build_model, count_params, resolve_unit
from resnet_exp.models.units import BLOCKS, BlockSpec, ResidualUnit
from resnet_exp.models.variants import ShortcutName, ShortcutSpec

__all__ = [
    "BLOCKS",
    "CifarResNet",
    "BlockSpec",
    "ResidualUnit",
    "ShortcutName",
    "ShortcutSpec",
    "build_model",
    "count_params",
    "resolve_unit",
]
