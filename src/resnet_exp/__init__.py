"""resnet-exp: experiments on where BN and ReLU sit in a residual unit (He et al. 2016)."""

from resnet_exp.models import ShortcutSpec, build_model, count_params

__all__ = ["ShortcutSpec", "build_model", "count_params"]
__version__ = "0.1.0"
