"""``init_from=PATH``: a new run (step 0, a new optimizer and schedule) that starts from
given weights: an export folder, a run folder or a .safetensors file (run/export.py's
``read_weights``, the one reader of weights by path).

``init_from.head=reset`` leaves the classifier as this run initialised it (fine-tuning
on other classes: CIFAR-10 -> CIFAR-100); ``init_from.strict=false`` loads what matches
by name and shape and lists the rest. Otherwise another net (depth, ordering, unit) is
a one-line error naming the first tensor that differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resnet_exp.config import Head, InitConfig
from resnet_exp.errors import UserError
from resnet_exp.run.checkpoint import Mismatch
from resnet_exp.run.export import read_weights

log = logging.getLogger("resnet_exp")

HEAD = "fc."  # the classifier's tensors (models/resnet.py)


@dataclass(frozen=True)
class InitWeights:
    """``init_from=``'s weights, read (and checked to be weights) with the run's context,
    before any data is loaded; put into the net once it is built."""

    path: str
    head: Head
    strict: bool
    state: dict[str, torch.Tensor]

    @classmethod
    def read(cls, init: InitConfig, trust: bool = False) -> InitWeights:
        state = read_weights(str(init.path), trust)
        return cls(str(init.path), init.head, init.strict, state)

    def load_into(self, model: nn.Module) -> dict[str, Any]:
        """Load the weights into ``model``; what summary.json records of it."""
        key = f"init_from={self.path}"
        ours = model.state_dict()
        kept = {k for k in ours if self.head is Head.reset and k.startswith(HEAD)}
        given = {k: v for k, v in self.state.items() if k not in kept}
        fits = {k: v for k, v in given.items() if k in ours and v.shape == ours[k].shape}
        left = sorted(k for k in ours if k not in fits and k not in kept)
        unused = sorted(k for k in given if k not in fits)
        if self.strict and (left or unused):
            raise UserError(_mismatch(key, ours, given))
        model.load_state_dict(fits, strict=False)
        if kept:
            log.info(
                "%s: the classifier (%s) starts afresh (init_from.head=reset)", key, HEAD + "*"
            )
        not_loaded = sorted({*left, *unused})  # this net's, and the given ones' (by name)
        if not_loaded:
            log.info(
                "%s: %d tensors loaded; not loaded (init_from.strict=false): %s",
                key,
                len(fits),
                ", ".join(not_loaded),
            )
        else:
            log.info("%s: all %d tensors loaded", key, len(fits))
        return {
            "init_from": self.path,
            "init_from_head": self.head.value,
            "init_from_not_loaded": not_loaded,
        }


def _mismatch(key: str, ours: dict[str, Any], given: dict[str, Any]) -> str:
    """One line naming the first tensor that differs, and what would take it."""
    m = Mismatch.of(ours, given)
    first = m.first
    if m.shaped:
        what = f"{first} is {tuple(given[first].shape)} there, {tuple(ours[first].shape)} here"
    elif m.missing:
        what = f"{first} is missing there"
    else:
        what = f"{first} is not in this net"
    hint = (
        "for other classes pass init_from.head=reset"
        if m.shaped and all(k.startswith(HEAD) for k in m.shaped) and not (m.missing or m.extra)
        else "pass weights of this net (depth, block, unit), or init_from.strict=false"
    )
    return (
        f"{key} holds weights of another net ({len(m.shaped)} of another shape, "
        f"{len(m.missing)} missing, {len(m.extra)} unexpected; first: {what}); {hint}"
    )
