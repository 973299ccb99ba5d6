"""Evaluation of a run's net on a split: loss, top-1 and top-5 error, per test crop.

One pass for the trainer's scheduled evaluations and for ``mode=eval``, which
also asks for the error of every class. Sums stay on the device (one host sync
at the end); in a data-parallel run each rank evaluates its share and the sums
are added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnet_exp.data import FileSplit, Placement, Split
from resnet_exp.run import distributed
from resnet_exp.run.runtime import autocast
from resnet_exp.train.setup import Setup


@torch.inference_mode()
def evaluate(
    s: Setup, split: Split | FileSplit, per_class: bool = False
) -> tuple[dict[str, float], torch.Tensor | None]:
    """``({"loss", "error", "top5_error", and "<key>_<crop>" for each further test
    crop of streamed data, e.g. "error_320"}, per-class counts or None)``.

    ``per_class``: a (2, classes) tensor of wrong predictions and images per class
    (of the first crop).
    """
    s.model.eval()
    suffixes = s.data.eval_names(s.cfg.data)
    # per crop: loss, top-1 wrong, top-5 wrong, images (every rank has every crop)
    sums = torch.zeros(len(suffixes), 4, device=s.device, dtype=torch.float64)
    classes = s.data.num_classes
    counts = torch.zeros(2, classes, device=s.device, dtype=torch.int64) if per_class else None
    dist = distributed.current()
    at = Placement(s.device, s.channels_last, dist.rank, dist.world)
    batches = s.data.eval_batches(split, s.cfg.data, at)
    for views, y in batches:  # ({crop suffix: images}, labels) of this rank's share
        valid = y >= 0  # a streamed image that could not be read is not counted
        for c, suffix in enumerate(suffixes):
            with autocast(s.device, s.precision):
                logits = s.model(views[suffix])
            wrong = (logits.argmax(1) != y) & valid
            hit5 = (logits.topk(min(5, classes), 1).indices == y[:, None]).any(1)
            loss = F.cross_entropy(logits.float(), y, reduction="sum", ignore_index=-1)
            sums[c] += torch.stack(
                [loss.double(), wrong.sum().double(), (~hit5 & valid).sum().double(), valid.sum()]
            )
            if counts is not None and c == 0:
                counts[0] += torch.bincount(y[wrong], minlength=classes)
                counts[1] += torch.bincount(y[valid], minlength=classes)
    s.model.train()
    distributed.sum_(sums)
    if counts is not None:
        distributed.sum_(counts)
    out: dict[str, float] = {}
    for suffix, (loss, wrong, wrong5, n) in zip(suffixes, sums.tolist()):
        n = max(n, 1.0)
        out[f"loss{suffix}"] = loss / n
        out[f"error{suffix}"] = 100.0 * wrong / n
        out[f"top5_error{suffix}"] = 100.0 * wrong5 / n
    return out, (counts.cpu() if counts is not None else None)
