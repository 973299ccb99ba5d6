"""The choices that describe a net: every allowed value and every default, written once.

The config schema (``config.py``) types its ``model`` fields with these enums
and extends ``NetOptions``; ``build_model`` and the modules read the same
enums, so a value the config accepts is one the net builds, and the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, TypeVar

from resnet_exp.errors import UserError

E = TypeVar("E", bound=Enum)


class Block(str, Enum):
    """The unit orderings of the paper's Fig. 4, (a) to (e)."""

    original = "original"
    bn_after_add = "bn_after_add"
    relu_before_add = "relu_before_add"
    relu_only_preact = "relu_only_preact"
    preact = "preact"


class Unit(str, Enum):
    auto = "auto"
    basic = "basic"
    bottleneck = "bottleneck"
    single = "single"


class Downsample(str, Enum):
    auto = "auto"
    A = "A"  # zero-padding identity
    B = "B"  # strided 1x1 projection


class Family(str, Enum):
    auto = "auto"  # imagenet for streamed data, cifar otherwise
    cifar = "cifar"  # 3x3 stem, three stages (the paper's CIFAR nets)
    imagenet = "imagenet"  # 7x7 stem and max-pool, four stages (depths 18-200)


class StrideAt(str, Enum):
    first = "first"  # a downsampling unit's first conv (the bottleneck's 1x1): the authors' code
    conv3x3 = "conv3x3"  # its first 3x3 conv: fb.resnet.torch


class PreactShortcut(str, Enum):
    shared = "shared"  # a reshaping shortcut reads the unit's BN-ReLU (the authors' Torch code)
    raw = "raw"  # it reads the unit's raw input


class BnStats(str, Enum):
    first = "first"  # running statistics of the first group (rank 0's under DDP)
    mean = "mean"  # the mean of the groups' updates


def choose(enum: type[E], value: Any, key: str) -> E:
    """``value`` (a member or its name) as a member of ``enum``; else one line naming
    ``key``, the value and what is allowed."""
    try:
        return enum(getattr(value, "value", value))
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise UserError(f"{key}={value!r} is not one of {allowed}") from None


@dataclass
class NetOptions:
    """Where the paper and the authors' code leave a choice (docs/fidelity.md); the
    defaults follow the authors' code. The same for both families.

    ``stride_at``: see ``ResidualUnit``. ``preact_shortcut``: in a pre-activation
    net, a shortcut that changes the shape (zero padding or projection, on the
    first unit of a stage) reads the unit's shared pre-activation (``shared``:
    fb.resnet.torch's ``both_preact``, resnet-pre-act.lua's "common BN, ReLU") or
    its raw input (``raw``). ``bn_group``: batch norm statistics per group of that
    many images of a training batch (``ghost_bn.py``; None: the whole batch),
    ``bn_stats`` which running statistics are kept. ``fp32_identity``: under
    autocast the identity path (stem output, every sum), the gates and scalings
    and the classifier run in fp32; the convolutions in the autocast dtype.
    """

    stride_at: StrideAt = StrideAt.first  # where a downsampling unit's stride sits
    preact_shortcut: PreactShortcut = PreactShortcut.shared  # input of pre-act reshaping shortcuts
    bn_group: int | None = None  # BN statistics per group of this many images (null: whole batch)
    bn_stats: BnStats = BnStats.first  # with bn_group: which group's running statistics are kept
    fp32_identity: bool = True  # under autocast: identity path, gates, classifier in fp32

    @classmethod
    def of(cls, source: Any = None, **values: Any) -> NetOptions:
        """Checked options from the fields of ``source`` (a config) and from ``values``
        (names or members); what neither gives keeps its default."""
        given = {f.name: getattr(source, f.name) for f in fields(cls)} if source else {}
        given |= values
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown net options: {', '.join(unknown)}")
        opts = cls(**given)
        for f in fields(cls):
            if isinstance(f.default, Enum):
                setattr(
                    opts, f.name, choose(type(f.default), getattr(opts, f.name), f"model.{f.name}")
                )
        if opts.bn_group is not None and opts.bn_group < 1:
            raise UserError(
                f"model.bn_group={opts.bn_group} must be at least 1 (or null: the whole batch)"
            )
        return opts
