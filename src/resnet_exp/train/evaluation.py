"""One pass of a net over a split: loss, top-1 and top-5 error, per test crop.

The trainer's scheduled evaluations and ``mode=eval`` (which also asks for the error
of every class) both run it. Sums stay on the device (one host sync at the end); in
a data-parallel run each rank evaluates its share (``at``) and the sums are added.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from resnet_exp.config import Precision
from resnet_exp.data import DataSource, Placement
from resnet_exp.run import distributed
from resnet_exp.run.runtime import autocast
from resnet_exp.train.setup import Setup

EMA_SUFFIX = (
    "_ema"  # the averaged weights' values: "error_ema", in summary.json "final_test_error_ema"
)


@torch.inference_mode()
def evaluate_split(
    model: nn.Module,
    data: DataSource,
    split: Sized,
    at: Placement,
    precision: Precision,
    per_class: bool = False,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """``({"loss", "error", "top5_error", and "<key>_<crop>" for each further test
    crop of streamed data, e.g. "error_320"}, per-class counts or None)``.

    ``per_class``: a (2, classes) tensor of wrong predictions and images per class
    (of the first crop). The net is put in eval mode and back in train mode after.
    """
    model.eval()
    suffixes = data.eval_names()
    # per crop: loss, top-1 wrong, top-5 wrong, images (every rank has every crop)
    sums = torch.zeros(len(suffixes), 4, device=at.device, dtype=torch.float64)
    classes = data.num_classes
    counts = torch.zeros(2, classes, device=at.device, dtype=torch.int64) if per_class else None
    for views, y in data.eval_batches(split, at):  # ({crop: images}, labels) of this rank's share
        valid = y >= 0  # a streamed image that could not be read is not counted
        for c, suffix in enumerate(suffixes):
            with autocast(at.device, precision):
                logits = model(views[suffix])
            wrong = (logits.argmax(1) != y) & valid
            hit5 = (logits.topk(min(5, classes), 1).indices == y[:, None]).any(1)
            loss = F.cross_entropy(logits.float(), y, reduction="sum", ignore_index=-1)
            sums[c] += torch.stack(
                [loss.double(), wrong.sum().double(), (~hit5 & valid).sum().double(), valid.sum()]
            )
            if counts is not None and c == 0:
                counts[0] += torch.bincount(y[wrong], minlength=classes)
                counts[1] += torch.bincount(y[valid], minlength=classes)
    model.train()
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


@dataclass(frozen=True)
class Evaluation:
    """One evaluation during training: where it happened and what it measured."""

    step: int
    epoch: int  # 1-based: the epoch the step belongs to
    scheduled: bool  # on the trainer.eval_every schedule (not only the run's last step)
    split: str  # test, or val with a validation split
    values: dict[str, float]  # loss, error, top5_error (and per further test crop)

    @property
    def error(self) -> float:
        return self.values["error"]

    def named(self) -> dict[str, float]:
        """``{"test_loss": ..., "test_error": ...}``: the values under the split's name."""
        return {f"{self.split}_{k}": v for k, v in self.values.items()}


class Evaluator:
    """When a training run evaluates, and the pass itself on the evaluated split.

    Scheduled: at the end of every ``eval_every``-th epoch. The run's last step is
    always evaluated (for its summary); if it ends mid-epoch (``max_steps``), that
    evaluation is not a scheduled one and does not count towards the best error.
    """

    def __init__(self, s: Setup, every: int) -> None:
        self.s, self.every = s, every
        self.per_epoch = s.loader.steps_per_epoch

    def due(self, step: int) -> bool:
        return self.scheduled(step) or step == self.s.total_steps

    def scheduled(self, step: int) -> bool:
        epoch = (step - 1) // self.per_epoch + 1
        return step % self.per_epoch == 0 and epoch % self.every == 0

    def __call__(self, step: int) -> Evaluation:
        s = self.s
        values = self.evaluate(s.data.eval_split)
        epoch = (step - 1) // self.per_epoch + 1
        return Evaluation(step, epoch, self.scheduled(step), s.data.eval_name, values)

    def test_set(self) -> dict[str, float]:
        """The test set once, at the end of a run evaluated on a validation split."""
        return {f"test_{k}": v for k, v in self.evaluate(self.s.data.test).items()}

    def evaluate(self, split: Sized) -> dict[str, float]:
        """The net's values on ``split``; with ``trainer.ema``, the averaged weights' on
        the same images beside them (``error_ema``, ...). The best error and a search's
        pruning read the net's own (``error``)."""
        s = self.s
        values, _ = evaluate_split(s.model, s.data, split, s.ctx.placement, s.ctx.precision)
        if s.ema is not None:
            ema, _ = evaluate_split(s.ema.module, s.data, split, s.ctx.placement, s.ctx.precision)
            values.update({f"{k}{EMA_SUFFIX}": v for k, v in ema.items()})
        return values
