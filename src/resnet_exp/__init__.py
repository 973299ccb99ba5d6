"""resnet-exp: experiments on where BN and ReLU sit in a residual unit (He et al. 2016)."""

from resnet_exp.models import ShortcutSpec, build_model, count_params
from resnet_exp.version import __version__

__all__ = [
    "__version__",
    "ShortcutSpec",
    "build_model",
    "count_params",
    "load_pretrained",
    "load_run",
    "read_weights",
]

# Loaded on first use: load_run imports the trainer, the export readers safetensors.
_LAZY = {
    "load_run": "resnet_exp.modes.evaluate",
    "load_pretrained": "resnet_exp.run.export",
    "read_weights": "resnet_exp.run.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resnet_exp' has no attribute {name!r}")
