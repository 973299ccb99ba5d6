from resnet_exp.models.build import NetSpec, build_model, resolve_family
from resnet_exp.models.cifar import resolve_unit
from resnet_exp.models.options import NetOptions
from resnet_exp.models.resnet import ResNet, count_params
from resnet_exp.models.units import BLOCKS, BlockSpec, ResidualUnit
from resnet_exp.models.variants import ShortcutName, ShortcutSpec

__all__ = [
    "BLOCKS",
    "BlockSpec",
    "NetOptions",
    "NetSpec",
    "ResNet",
    "ResidualUnit",
    "ShortcutName",
    "ShortcutSpec",
    "build_model",
    "count_params",
    "resolve_family",
    "resolve_unit",
]
