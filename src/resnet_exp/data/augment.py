"""fb.resnet.torch's ImageNet augmentation, as per-image crops and batched colour ops.

Training (``datasets/imagenet.lua``): a random-sized crop (8-100% of the
area, aspect ratio 3/4-4/3, resized to the crop size), colour jitter
(brightness, contrast, saturation by 1 +- 0.4, in random order), AlexNet's
PCA lighting noise (std 0.1), normalisation, horizontal flip. Evaluation: the
shorter side resized to ``crop / ratio`` (256 for 224), the centre crop.

Geometry is per image (sizes differ until the crop); colour is one batched
expression. Every random number of an image comes from a generator seeded by
(seed, epoch, image index), so a batch does not depend on which worker or
device made it, and a resumed run draws the same numbers. The same functions
run on CPU tensors (DataLoader workers) and on CUDA tensors (decoded on the
GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# datasets/imagenet.lua: "computed from random subset of ImageNet training images"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
JITTER = 0.4  # brightness, contrast, saturation
LIGHTING_STD = 0.1
GRAY = (0.299, 0.587, 0.114)
# Bilinear with antialiasing (fb.resnet.torch scales bicubically): the
# torchvision default, and several times faster than bicubic on a CPU.
RESIZE = InterpolationMode.BILINEAR


def image_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image in one epoch: independent of worker, rank and device."""
    return np.random.default_rng((seed, epoch, index))


@dataclass(frozen=True)
class Crop:
    top: int
    left: int
    height: int
    width: int


def random_sized_crop(rng: np.random.Generator, h: int, w: int) -> Crop:
    """transforms.lua RandomSizedCrop: up to 10 tries, then the centre square."""
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * h * w
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if rng.uniform() < 0.5:
            cw, ch = ch, cw
        if 0 < ch <= h and 0 < cw <= w:
            return Crop(int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw)
    # Fallback: Scale(size) then CenterCrop(size) = the centre square of the shorter side.
    side = min(h, w)
    return Crop((h - side) // 2, (w - side) // 2, side, side)


@dataclass(frozen=True)
class TrainParams:
    crop: Crop
    flip: bool
    colour: np.ndarray  # 9 floats: 3 jitter factors, their order (a permutation), 3 lighting alphas


def sample_train(rng: np.random.Generator, h: int, w: int) -> TrainParams:
    crop = random_sized_crop(rng, h, w)
    jitter = 1.0 + rng.uniform(-JITTER, JITTER, 3)  # brightness, contrast, saturation
    order = rng.permutation(3).astype(np.float64)  # transforms.lua RandomOrder
    light = rng.normal(0.0, LIGHTING_STD, 3)
    flip = bool(rng.uniform() < 0.5)
    return TrainParams(crop, flip, np.concatenate([jitter, order, light]))


def crop_resize(img: torch.Tensor, p: TrainParams, size: int) -> torch.Tensor:
    """The training crop of one uint8 CHW image, resized to ``size`` x ``size``, flipped or not."""
    c = p.crop
    out = TF.resized_crop(
        img, c.top, c.left, c.height, c.width, [size, size], interpolation=RESIZE, antialias=True
    )
    return out.flip(-1) if p.flip else out


def centre_crops(img: torch.Tensor, crops: list[int], ratio: float) -> list[torch.Tensor]:
    """One uint8 view per test crop: shorter side resized to ``crop / ratio``, centre crop."""
    views = []
    for size in crops:
        resized = TF.resize(img, [round(size / ratio)], interpolation=RESIZE, antialias=True)
        views.append(TF.center_crop(resized, [size, size]))
    return views


class ColourNormalize:
    """uint8 batch -> float: colour jitter and lighting (training), then normalisation.

    ``colour`` holds each image's 9 numbers from ``sample_train``; without it
    (evaluation) only the normalisation runs.
    """

    def __init__(
        self,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: torch.device | str = "cpu",
    ) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.gray = torch.tensor(GRAY, device=device).view(1, 3, 1, 1)
        # rgb shift = eigvec @ (alpha * eigval): one (B,3) x (3,3) product
        self.pca = (
            torch.tensor(PCA_EIGVEC, device=device) * torch.tensor(PCA_EIGVAL, device=device)
        ).T

    def __call__(self, x: torch.Tensor, colour: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float().div_(255.0)
        if colour is not None:
            x = self._jitter(x, colour[:, 0:3], colour[:, 3:6].long())
            x = x + (colour[:, 6:9] @ self.pca).view(-1, 3, 1, 1)
        return (x - self.mean) / self.std

    def _jitter(self, x: torch.Tensor, alpha: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Each image blends towards black (brightness), its mean grey (contrast) and its
        greyscale (saturation), in its own order: three rounds of one blend each."""
        b = len(x)
        for r in range(3):
            op = order[:, r].view(b, 1, 1, 1)
            a = alpha.gather(1, order[:, r : r + 1]).view(b, 1, 1, 1)
            gray = (x * self.gray).sum(1, keepdim=True)
            target = torch.where(
                op == 0,
                torch.zeros((), device=x.device),
                torch.where(op == 1, gray.mean((2, 3), keepdim=True), gray),
            )
            x = x * a + target * (1 - a)
        return x
