"""resnet-exp: experiments on where BN and ReLU sit in a residual unit (He et al. 2016)."""

from resnet_exp.models import ShortcutSpec, build_model, count_params

__all__ = ["ShortcutSpec", "build_model", "count_params", "load_run"]
__version__ = "0.1.0"


def __getattr__(name: str):  # load_run on first use: it imports the trainer
    if name == "load_run":
        from resnet_exp.modes.evaluate import load_run

        return load_run
    raise AttributeError(f"module 'resnet_exp' has no attribute {name!r}")
