"""Image folders too large to hold decoded: ImageNet's ``train/`` and ``val/`` class folders.

Only the file list is held in memory: relative paths in one NumPy byte
array (no per-path Python objects, so forked DataLoader workers share it
without copying it page by page) and the labels in one tensor. Images are
read, decoded and augmented per batch (``stream.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from resnet_exp.config import DataConfig
from resnet_exp.data.augment import IMAGENET_MEAN, IMAGENET_STD
from resnet_exp.data.splits import (
    SPLIT_SEED,
    FileSplit,
    Placement,
    Splits,
    check_limits,
    check_same_classes,
    limit,
)
from resnet_exp.data.stream import (
    StreamLoader,
    crop_suffix,
    eval_crops,
    stream_eval_batches,
)
from resnet_exp.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


class StreamedSource(Splits[FileSplit]):
    """File lists, read and decoded per batch (``stream.py``)."""

    def train_loader(self, batch_size: int, seed: int, at: Placement) -> StreamLoader:
        return StreamLoader(
            self.train, self.cfg, batch_size, at.device, seed, at.channels_last, at.rank, at.world
        )

    def eval_names(self) -> list[str]:
        crops = eval_crops(self.cfg)
        return [crop_suffix(crops, c) for c in range(len(crops))]

    def eval_batches(
        self, split: FileSplit, at: Placement
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        cfg = self.cfg
        return stream_eval_batches(split, cfg, at.device, at.channels_last, at.rank, at.world)


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


def load_streamed(cfg: DataConfig) -> StreamedSource:
    root = Path(cfg.root)
    test_name = eval_folder(cfg)
    if cfg.val_size:
        raise UserError(
            f"data.val_size={cfg.val_size} is not supported for streamed data "
            f"(dataset={cfg.name}): it evaluates on {test_name}/; use data.val_size=0"
        )
    check_limits(cfg)
    classes, train, test = _on_rank0(_scan_splits, root, test_name)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    train = limit(train, cfg.train_limit, gen)
    test = limit(test, cfg.test_limit, gen)
    # The data set is not read to compute its statistics: fb.resnet.torch's ImageNet ones.
    return StreamedSource(
        train, test, None, classes, IMAGENET_MEAN, IMAGENET_STD,
        f"image folders streamed from {root} (train/, {test_name}/)", cfg,
    )  # fmt: skip


def _scan_splits(root: Path, test_name: str) -> tuple[list[str], FileSplit, FileSplit]:
    for name in ("train", test_name):
        if not (root / name).is_dir():
            layout = f"train/<class>/*.JPEG and {test_name}/<class>/*.JPEG"
            raise UserError(f"data.root={str(root)!r} has no {name}/ folder; expected {layout}")
    classes, train = scan(root / "train")
    test_classes, test = scan(root / test_name)
    check_same_classes(classes, test_classes, root, test_name, "class folders")
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
