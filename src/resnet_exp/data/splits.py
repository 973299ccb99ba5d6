"""What both data paths share: their split types, the fixed split seed, the size
limits and the check that training and test images have the same classes.

``Split`` holds decoded images (CIFAR, small image folders, synthetic data);
``FileSplit`` holds only a file list (ImageNet, streamed per batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch

from resnet_exp.config import DataConfig
from resnet_exp.errors import UserError


@dataclass(frozen=True)
class Placement:
    """Where one rank's batches go: its device and memory format, and its share of
    the images (every ``world``-th, from ``rank``)."""

    device: torch.device
    channels_last: bool = True
    rank: int = 0
    world: int = 1


# A fixed seed for splits and limits, so every run (and every seed of a
# sweep) sees the same validation set and the same subset.
SPLIT_SEED = 0


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.images[idx], self.labels[idx])


@dataclass
class FileSplit:
    root: Path
    paths: np.ndarray  # relative paths, dtype S (bytes)
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def subset(self, idx: torch.Tensor) -> FileSplit:
        return FileSplit(self.root, self.paths[idx.numpy()], self.labels[idx])


S = TypeVar("S", Split, FileSplit)


@dataclass
class Splits(Generic[S]):
    """A data set's splits and what is known of it; each data path adds its batches.

    ``cfg`` is the data config the set was loaded with: its batches follow it
    (augmentation, test crops, decoding), so the methods take only what a caller
    decides (a batch size, a seed, a placement).
    """

    train: S
    test: S
    val: S | None
    classes: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    source: str
    cfg: DataConfig = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def eval_name(self) -> str:
        return "val" if self.val is not None else "test"

    @property
    def eval_split(self) -> S:
        return self.val if self.val is not None else self.test


def check_limits(cfg: DataConfig) -> None:
    for key in ("train_limit", "test_limit"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UserError(
                f"data.{key}={value} must be a positive number of images (or null for all)"
            )


def limit(split: S, n: int | None, gen: torch.Generator) -> S:
    """``n`` images drawn with ``gen`` (in their original order), or all if fewer."""
    if n is None or n >= len(split):
        return split
    return split.subset(torch.randperm(len(split), generator=gen)[:n].sort().values)


def check_same_classes(
    classes: list[str], test_classes: list[str], root: Path, test_name: str, noun: str
) -> None:
    """``noun``: what the classes are called in the message ("classes", "class folders")."""
    if classes == test_classes:
        return
    only = sorted(set(classes) ^ set(test_classes))
    listed = ", ".join(only[:10]) + (" ..." if len(only) > 10 else "")
    raise UserError(
        f"train/ and {test_name}/ in {root} have different {noun} "
        f"({len(classes)} vs {len(test_classes)}; in only one: {listed or 'order differs'})"
    )
