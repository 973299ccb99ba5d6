"""fb.resnet.torch's ImageNet augmentation, as per-image crops and batched colour ops.

Training (``datasets/imagenet.lua``): a random-sized crop (8-100% of the
area, aspect ratio 3/4-4/3, resized to the crop size, bicubic or bilinear), colour jitter
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
# data.interpolation: bicubic as fb.resnet.torch (transforms.lua:38, 155), or
# bilinear; both antialiased when shrinking (Torch's image.scale is not).
RESIZE = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


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


def crop_resize(
    img: torch.Tensor, p: TrainParams, size: int, interpolation: str = "bicubic"
) -> torch.Tensor:
    """The training crop of one uint8 CHW image, resized to ``size`` x ``size``, flipped or not."""
    c = p.crop
    mode = RESIZE[interpolation]
    out = TF.resized_crop(
        img, c.top, c.left, c.height, c.width, [size, size], interpolation=mode, antialias=True
    )
    return out.flip(-1) if p.flip else out


def centre_crops(
    img: torch.Tensor, crops: list[int], ratio: float, interpolation: str = "bicubic"
) -> list[torch.Tensor]:
    """One uint8 view per test crop: shorter side resized to ``crop / ratio``, centre crop."""
    views, mode = [], RESIZE[interpolation]
    for size in crops:
        resized = TF.resize(img, [round(size / ratio)], interpolation=mode, antialias=True)
        views.append(TF.center_crop(resized, [size, size]))
    return views


class ColourNormalize:
    """uint8 batch -> float: colour jitter and lighting (training), then normalisation.

    ``colour`` holds each image's 9 numbers from ``sample_train``; without it
    (evaluation) only the normalisation runs. Brightness, contrast and
    saturation blends, the lighting shift and the normalisation are all affine
    maps of a pixel's RGB vector (contrast's grey mean is the mean of the
    image so far, itself affine in the image's mean colour), so each image's
    whole chain composes into one 3x3 matrix and offset, applied in one pass:
    the same result as fb.resnet.torch's op-by-op chain (tested) in one pass.
    """

    def __init__(
        self,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: torch.device | str = "cpu",
    ) -> None:
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.gray = torch.tensor(GRAY, device=device)
        # rgb shift = eigvec @ (alpha * eigval): one (B,3) x (3,3) product
        self.pca = (
            torch.tensor(PCA_EIGVEC, device=device) * torch.tensor(PCA_EIGVAL, device=device)
        ).T

    def __call__(self, x: torch.Tensor, colour: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        xf = x.float()
        if colour is None:
            m = torch.eye(3, device=x.device).expand(b, 3, 3)
            shift = torch.zeros(b, 3, device=x.device)
        else:
            m, shift = self._jitter(xf.mean((2, 3)) / 255.0, colour[:, 0:3], colour[:, 3:6].long())
            shift = shift + colour[:, 6:9] @ self.pca  # lighting
        # normalise: (M x / 255 + shift - mean) / std
        a = m / (255.0 * self.std.view(1, 3, 1))
        d = (shift - self.mean) / self.std
        return torch.baddbmm(d[:, :, None], a, xf.reshape(b, c, h * w)).view(b, c, h, w)

    def _jitter(
        self, mu: torch.Tensor, alpha: torch.Tensor, order: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image blends towards black (brightness, op 0), its mean grey (contrast,
        op 1) and its greyscale (saturation, op 2), in its own order. Returns the
        composed (B,3,3) matrix and (B,3) offset, for images in [0, 1] with mean colour mu."""
        b, dev = len(mu), mu.device
        eye = torch.eye(3, device=dev).expand(b, 3, 3)
        to_gray = torch.ones(3, 1, device=dev) * self.gray.view(1, 3)  # grey, in every channel
        m, c = eye, torch.zeros(b, 3, device=dev)
        for r in range(3):
            op = order[:, r].view(b, 1)
            a = alpha.gather(1, order[:, r : r + 1])  # (B, 1)
            grey_mean = ((m @ mu[:, :, None]).squeeze(2) + c) @ self.gray  # of the image so far
            t = a[:, :, None] * eye + ((op == 2) * (1 - a))[:, :, None] * to_gray
            offset = ((op == 1) * (1 - a)) * grey_mean[:, None]  # (B, 1): same in each channel
            m = t @ m
            c = (t @ c[:, :, None]).squeeze(2) + offset
        return m, c
