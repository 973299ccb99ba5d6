"""Regularisers beyond the paper, per training batch on the device: cutout, mixup, cutmix.

- cutout (DeVries & Taylor 2017, arXiv 1708.04552): in each image a ``size``x``size``
  square, centred on a uniformly drawn pixel and clipped at the border, set to 0 in
  normalised units, i.e. to the data set's mean colour (their code also cuts the
  normalised tensor);
- mixup (Zhang et al. 2018, arXiv 1710.09412): image i becomes ``lam * x_i + (1 - lam)
  * x_j`` with j = a random permutation of the batch and one ``lam ~ Beta(a, a)`` per
  batch, its target ``lam * onehot(y_i) + (1 - lam) * onehot(y_j)``;
- cutmix (Yun et al. 2019, arXiv 1905.04899): one box per batch (side ``sqrt(1 - lam)``
  of the image's, centred on a uniform pixel, clipped) pasted from image j into image
  i; the target weight of y_i is the share of the image left, 1 - box area / image area.
  With both alphas set, each batch takes one or the other with probability 1/2 (as
  timm's ``Mixup`` does).

Hand-written rather than torchvision's v2 ``RandomErasing``/``MixUp``/``CutMix``: those
draw from the global RNG (their parameters come from ``torch.rand``/``torch.empty().
uniform_()``/``Beta.sample()`` without a generator), and ``RandomErasing`` called on a
batch erases the same box in every image. Here every draw comes from one generator
that the checkpoint keeps beside the loader's position (a resumed run draws the same
boxes and pairs), and each op is a few tensor ops on the whole batch, with no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from resnet_exp.config import DataConfig
from resnet_exp.data.interface import TrainBatches
from resnet_exp.data.loader import restore_draws
from resnet_exp.data.splits import Placement
from resnet_exp.errors import UserError

STATE_KEY = "batch_aug_gen"  # the generator's state, beside the wrapped loader's own keys
# The generator's seed: seed + 1 + rank (the crops' own) moved to a stream of its own.
STREAM = 1 << 32

Mixed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def check_batch_aug(cfg: DataConfig) -> None:
    """The three settings, each as one line naming it."""
    if cfg.cutout < 0:
        raise UserError(f"data.cutout={cfg.cutout} must be >= 0 (a side in pixels; 0: off)")
    for key in ("mixup_alpha", "cutmix_alpha"):
        value = getattr(cfg, key)
        if not value >= 0 or value == float("inf"):
            raise UserError(f"data.{key}={value} must be a number >= 0 (0: off)")


def beta(alpha: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``lam ~ Beta(alpha, alpha)``, a 0-dim tensor on ``device``. ``torch.distributions.Beta``
    samples with the global RNG; the kernel it calls, ``torch._sample_dirichlet``, takes
    a generator."""
    concentration = torch.full((2,), float(alpha), device=device)
    return torch._sample_dirichlet(concentration, generator=gen)[0]


def _span(ar: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Which of the positions ``ar`` lie in [start, stop) (broadcast)."""
    return (ar >= start) & (ar < stop)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Each image with a ``size``x``size`` square set to 0, centred on a pixel drawn
    uniformly (DeVries & Taylor's code: ``y - size // 2`` to ``y - size // 2 + size``),
    the part outside the image dropped."""
    b, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (b, 1), device=dev, generator=gen) - size // 2
    cx = torch.randint(0, w, (b, 1), device=dev, generator=gen) - size // 2
    rows = _span(torch.arange(h, device=dev), cy, cy + size)  # (b, h)
    cols = _span(torch.arange(w, device=dev), cx, cx + size)  # (b, w)
    return x.masked_fill(rows[:, None, :, None] & cols[:, None, None, :], 0.0)


def soft_targets(
    labels: torch.Tensor, partner: torch.Tensor, weight: torch.Tensor, classes: int
) -> torch.Tensor:
    """``weight * onehot(y_i) + (1 - weight) * onehot(y_partner[i])``, float32 rows summing to 1."""
    one = F.one_hot(labels, classes).float()
    return torch.lerp(one, one[partner], 1 - weight)


def mixup(
    x: torch.Tensor, labels: torch.Tensor, alpha: float, classes: int, gen: torch.Generator
) -> Mixed:
    """(mixed images, soft targets, each image's partner, the weight of its own image)."""
    lam = beta(alpha, gen, x.device)
    partner = torch.randperm(len(labels), device=x.device, generator=gen)
    mixed = torch.lerp(x, x[partner], 1 - lam)  # lam * x + (1 - lam) * x[partner]
    return mixed, soft_targets(labels, partner, lam, classes), partner, lam


def cutmix(
    x: torch.Tensor, labels: torch.Tensor, alpha: float, classes: int, gen: torch.Generator
) -> Mixed:
    """(images with the partner's box pasted in, soft targets, partners, the share of
    each image left: 1 - box area / image area). The box as Yun et al.'s ``rand_bbox``:
    sides ``int(side * sqrt(1 - lam))``, from ``c - cut // 2`` to ``c + cut // 2``, clipped."""
    _, _, h, w = x.shape
    dev = x.device
    lam = beta(alpha, gen, dev)
    partner = torch.randperm(len(labels), device=dev, generator=gen)
    cut = torch.sqrt(1 - lam)
    half_h, half_w = (cut * h).long() // 2, (cut * w).long() // 2
    cy = torch.randint(0, h, (), device=dev, generator=gen)
    cx = torch.randint(0, w, (), device=dev, generator=gen)
    y0, y1 = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
    x0, x1 = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
    box = _span(torch.arange(h, device=dev), y0, y1)[:, None] & _span(
        torch.arange(w, device=dev), x0, x1
    )
    mixed = torch.where(box, x[partner], x)
    weight = 1 - ((y1 - y0) * (x1 - x0)).float() / (h * w)
    return mixed, soft_targets(labels, partner, weight, classes), partner, weight


class BatchAugment:
    """A loader's batches with cutout and mixup/cutmix applied; with mixing, the targets
    are soft (``(batch, classes)`` float rows) instead of labels. Its state is the
    loader's position and its own generator's state."""

    def __init__(
        self, loader: TrainBatches, cfg: DataConfig, classes: int, seed: int, at: Placement
    ) -> None:
        self.loader, self.classes = loader, classes
        self.size, self.mixup_alpha, self.cutmix_alpha = (
            cfg.cutout,
            cfg.mixup_alpha,
            cfg.cutmix_alpha,
        )
        self.device = at.device
        self.fmt = torch.channels_last if at.channels_last else torch.contiguous_format
        self.seed = seed + 1 + at.rank + STREAM
        self.gen = torch.Generator(device=at.device).manual_seed(self.seed)

    @classmethod
    def wrap(
        cls, loader: TrainBatches, cfg: DataConfig, classes: int, seed: int, at: Placement
    ) -> TrainBatches:
        """``loader`` itself when all three are off (the paper's recipe, drawn as before)."""
        check_batch_aug(cfg)
        if not (cfg.cutout or cfg.mixup_alpha or cfg.cutmix_alpha):
            return loader
        return cls(loader, cfg, classes, seed, at)

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @property
    def pos(self) -> int:
        return self.loader.pos

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next()
        if self.size:
            x = cutout(x, self.size, self.gen)
        if self.mixup_alpha and self.cutmix_alpha:  # one or the other, drawn per batch
            use_cutmix = torch.rand((), device=self.device, generator=self.gen) < 0.5
            xm, tm, _, _ = mixup(x, y, self.mixup_alpha, self.classes, self.gen)
            xc, tc, _, _ = cutmix(x, y, self.cutmix_alpha, self.classes, self.gen)
            x, y = torch.where(use_cutmix, xc, xm), torch.where(use_cutmix, tc, tm)
        elif self.mixup_alpha:
            x, y, _, _ = mixup(x, y, self.mixup_alpha, self.classes, self.gen)
        elif self.cutmix_alpha:
            x, y, _, _ = cutmix(x, y, self.cutmix_alpha, self.classes, self.gen)
        return x.contiguous(memory_format=self.fmt), y

    def report(self) -> dict[str, Any]:
        return self.loader.report()

    def state_dict(self) -> dict[str, Any]:
        return {**self.loader.state_dict(), STATE_KEY: self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The loader's position and these draws' generator; one saved on a device of
        another type (its state has another size) or for another rank (``None``) is
        seeded again from this rank's seed and the position, as the loader does."""
        self.loader.load_state_dict({k: v for k, v in state.items() if k != STATE_KEY})
        at = self.loader
        restore_draws(self.gen, state.get(STATE_KEY), self.seed, at.epoch, at.pos)
