"""Image folders too large to hold decoded: ImageNet's ``train/`` and ``val/`` class folders.

Only the file list is held in memory: relative paths in one NumPy byte
array (no per-path Python objects, so forked DataLoader workers share it
without copying it page by page) and the labels in one tensor. Images are
read, decoded and augmented per batch (``stream.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from resnet_exp.config import DataConfig
from resnet_exp.data.augment import IMAGENET_MEAN, IMAGENET_STD
from resnet_exp.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
# A fixed seed for limits, so every run and seed of a sweep uses the same subset.
SPLIT_SEED = 0


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


def is_streamed(cfg: DataConfig) -> bool:
    """ImageNet always streams; any image folder does with ``data.stream=true``."""
    return cfg.name == "imagenet" or (cfg.name == "imagefolder" and cfg.stream)


def eval_folder(cfg: DataConfig) -> str:
    return "val" if cfg.name == "imagenet" else "test"


def scan(folder: Path) -> tuple[list[str], FileSplit]:
    """``folder/<class>/<image>`` sorted by class and name (os.scandir: one pass, no stat)."""
    try:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError as e:
        raise UserError(f"cannot read {folder}: {e.strerror}") from e
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        names = sorted(
            e.name
            for e in os.scandir(folder / cls)
            if e.name.lower().endswith(EXTENSIONS) and not e.is_dir()
        )
        paths += [f"{cls}/{n}" for n in names]
        labels += [label] * len(names)
    if not paths:
        raise UserError(f"no images in {folder}: needs class subfolders holding image files")
    return classes, FileSplit(
        folder, np.array(paths, dtype=np.bytes_), torch.tensor(labels, dtype=torch.int64)
    )


def load_streamed(cfg: DataConfig):  # -> sources.Dataset
    from resnet_exp.data.sources import Dataset

    root = Path(cfg.root)
    test_name = eval_folder(cfg)
    if cfg.val_size:
        raise UserError(
            f"data.val_size={cfg.val_size} is not supported for streamed data "
            f"(dataset={cfg.name}): it evaluates on {test_name}/; use data.val_size=0"
        )
    for key in ("train_limit", "test_limit"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UserError(
                f"data.{key}={value} must be a positive number of images (or null for all)"
            )
    classes, train, test = _on_rank0(_scan_splits, root, test_name)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    if cfg.train_limit is not None and cfg.train_limit < len(train):
        train = train.subset(
            torch.randperm(len(train), generator=gen)[: cfg.train_limit].sort().values
        )
    if cfg.test_limit is not None and cfg.test_limit < len(test):
        test = test.subset(torch.randperm(len(test), generator=gen)[: cfg.test_limit].sort().values)
    # The data set is not read to compute its statistics: fb.resnet.torch's ImageNet ones.
    return Dataset(
        train, test, None, classes, IMAGENET_MEAN, IMAGENET_STD,  # type: ignore[arg-type]
        f"image folders streamed from {root} (train/, {test_name}/)",
    )  # fmt: skip


def _scan_splits(root: Path, test_name: str) -> tuple[list[str], FileSplit, FileSplit]:
    for name in ("train", test_name):
        if not (root / name).is_dir():
            layout = f"train/<class>/*.JPEG and {test_name}/<class>/*.JPEG"
            raise UserError(f"data.root={str(root)!r} has no {name}/ folder; expected {layout}")
    classes, train = scan(root / "train")
    test_classes, test = scan(root / test_name)
    if classes != test_classes:
        only = sorted(set(classes) ^ set(test_classes))
        raise UserError(
            f"train/ and {test_name}/ in {root} have different class folders "
            f"({len(classes)} vs {len(test_classes)}; in only one: "
            f"{', '.join(only[:10]) + (' ...' if len(only) > 10 else '') or 'order differs'})"
        )
    return classes, train, test


def _on_rank0(fn, *args):
    """``fn(*args)`` on rank 0 only, its result (or its UserError) sent to every rank:
    one listing of ImageNet's 1.33M files per run, not one per process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn(*args)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, fn(*args))]
        except UserError as e:
            box = [(False, str(e))]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise UserError(value)
    return value
