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
from typing import Any

from torch import nn

from resnet_exp.config import Head, InitConfig
from resnet_exp.errors import UserError
from resnet_exp.run.export import read_weights

log = logging.getLogger("resnet_exp")

HEAD = "fc."  # the classifier's tensors (models/resnet.py)


def start_from(model: nn.Module, init: InitConfig, trust: bool = False) -> dict[str, Any]:
    """Load ``init.path``'s weights into ``model``; what summary.json records of it."""
    key = f"init_from={init.path}"
    state = read_weights(str(init.path), trust)
    ours = model.state_dict()
    kept = {k for k in ours if init.head is Head.reset and k.startswith(HEAD)}
    given = {k: v for k, v in state.items() if k not in kept}
    fits = {k: v for k, v in given.items() if k in ours and v.shape == ours[k].shape}
    left = sorted(k for k in ours if k not in fits and k not in kept)
    unused = sorted(k for k in given if k not in fits)
    if init.strict and (left or unused):
        raise UserError(_mismatch(key, ours, given))
    model.load_state_dict(fits, strict=False)
    if kept:
        log.info("%s: the classifier (%s) starts afresh (init_from.head=reset)", key, HEAD + "*")
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
        "init_from": str(init.path),
        "init_from_head": init.head.value,
        "init_from_not_loaded": not_loaded,
    }


def _mismatch(key: str, ours: dict[str, Any], given: dict[str, Any]) -> str:
    """One line naming the first tensor that differs, and what would take it."""
    shaped = [k for k in ours if k in given and given[k].shape != ours[k].shape]
    missing = [k for k in ours if k not in given]
    extra = [k for k in given if k not in ours]
    if shaped:
        first = shaped[0]
        what = f"{first} is {tuple(given[first].shape)} there, {tuple(ours[first].shape)} here"
    elif missing:
        what = f"{missing[0]} is missing there"
    else:
        what = f"{extra[0]} is not in this net"
    hint = (
        "for other classes pass init_from.head=reset"
        if shaped and all(k.startswith(HEAD) for k in shaped) and not missing and not extra
        else "pass weights of this net (depth, block, unit), or init_from.strict=false"
    )
    return (
        f"{key} holds weights of another net ({len(shaped)} of another shape, "
        f"{len(missing)} missing, {len(extra)} unexpected; first: {what}); {hint}"
    )
