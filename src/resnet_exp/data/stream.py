"""Batches streamed from image files: the ImageNet data path's loaders.

Two ways to decode (reading and decoding: ``decode.py``), one augmentation
(``augment.py``):

- ``data.decode=workers`` (CPU runs): DataLoader worker processes each build
  a whole batch: read, decode (torchvision.io), crop and resize every image,
  and hand over uint8 crops (a quarter of float32's bytes through shared and
  pinned memory) with each image's colour numbers; the training process
  applies colour jitter, lighting and normalisation to the batch on its device.
- ``data.decode=device`` (the default on CUDA): workers only read the files;
  the training process decodes the JPEGs on the GPU in one batched nvjpeg
  call (``torchvision.io.decode_jpeg(device="cuda")``), crops, resizes and
  colours there. Files that are not JPEGs are decoded in the worker.

Order and sharding: epoch ``e`` is a permutation of the whole file list drawn
from (seed, e); rank ``r`` of ``world`` reads every world-th file of it, so the
ranks' shards are disjoint and together cover the epoch. A batch is named by
(epoch, position) and everything random in it by (seed, epoch, image index),
so ``state_dict`` is just the position, and the batches do not depend on the
number of workers.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from resnet_exp.config import DataConfig, Decode
from resnet_exp.data.augment import (
    ColourNormalize,
    TrainParams,
    centre_crops,
    crop_resize,
    image_rng,
    sample_train,
)
from resnet_exp.data.decode import (
    Bad,
    Packed,
    decode_on_device,
    policy_check,
    read_all,
    substitute,
)
from resnet_exp.data.splits import FileSplit
from resnet_exp.errors import UserError

log = logging.getLogger("resnet_exp")


def _quiet_worker(_: int) -> None:
    """Workers leave stop signals to the training process (it stops cleanly and
    checkpoints; run/stop.py); they end with it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def loader_workers(cfg: DataConfig, world: int) -> int:
    """``data.workers``, or by default this rank's share of the CPU cores."""
    if cfg.workers is not None:
        if cfg.workers < 0:
            raise UserError(f"data.workers={cfg.workers} must be >= 0 (0: read in this process)")
        return cfg.workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local))


def resolve_decode(cfg: DataConfig, device: torch.device) -> bool:
    """True: decode on the training device."""
    if cfg.decode is Decode.auto:
        return device.type == "cuda"
    return cfg.decode is Decode.device


@lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The epoch's permutation of all n files (the same on every rank)."""
    return np.random.default_rng((seed, epoch, n)).permutation(n)


def shard_indices(seed: int, epoch: int, n: int, rank: int, world: int) -> np.ndarray:
    """The file indices rank ``rank`` reads in ``epoch``, in order."""
    return epoch_order(seed, epoch, n)[rank::world]


@dataclass
class _Batch:
    key: tuple[int, int]
    images: Any  # uint8 (B,3,S,S) crops, or (device decode) the raw items, Packed
    colour: torch.Tensor | None  # (B, 9) float64
    labels: torch.Tensor
    index: np.ndarray
    bad: list[Bad]

    def pin_memory(self) -> _Batch:  # the DataLoader's pinning thread calls this
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        return self


class _TrainBatches(torch.utils.data.Dataset):
    """Batch (epoch, position) of one rank's shard, built in a worker."""

    def __init__(
        self,
        split: FileSplit,
        batch: int,
        size: int,
        seed: int,
        rank: int,
        world: int,
        raw: bool,
        interpolation: str = "bicubic",
    ) -> None:
        self.split, self.batch, self.size, self.seed = split, batch, size, seed
        self.rank, self.world, self.raw, self.interpolation = rank, world, raw, interpolation

    def indices(self, epoch: int, pos: int) -> np.ndarray:
        shard = shard_indices(self.seed, epoch, len(self.split), self.rank, self.world)
        return shard[pos * self.batch : (pos + 1) * self.batch]

    def __getitem__(self, key: tuple[int, int]) -> _Batch:
        epoch, pos = key
        index = self.indices(epoch, pos)
        items, bad = read_all([self.split.path(int(i)) for i in index], self.raw)
        labels = substitute(items, self.split.labels[index])
        if self.raw:
            return _Batch(key, Packed.of(items), None, labels, index, bad)
        if len(bad) == len(items):
            return _Batch(key, items, None, labels, index, bad)
        x, colour = augment_batch(items, index, self.seed, epoch, self.size, self.interpolation)
        return _Batch(key, x, colour, labels, index, bad)


def augment_batch(
    images: list[torch.Tensor],
    index: np.ndarray,
    seed: int,
    epoch: int,
    size: int,
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop, resize and flip each decoded image (on its device); the batch's colour numbers."""
    params: list[TrainParams] = []
    for img, i in zip(images, index):
        params.append(sample_train(image_rng(seed, epoch, int(i)), img.shape[-2], img.shape[-1]))
    x = torch.stack([crop_resize(img, p, size, interpolation) for img, p in zip(images, params)])
    colour = torch.from_numpy(np.stack([p.colour for p in params]))
    return x, colour


class _Keys(Sampler):
    """(epoch, position) from a start, without end."""

    def __init__(self, epoch: int, pos: int, steps: int) -> None:
        self.epoch, self.pos, self.steps = epoch, pos, steps

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, pos = self.epoch, self.pos
        while True:
            if pos == self.steps:
                epoch, pos = epoch + 1, 0
            yield epoch, pos
            pos += 1


class StreamLoader:
    """Endless training batches from files; the CIFAR ``TrainLoader``'s interface:
    ``next()``, ``steps_per_epoch``, ``epoch``/``pos``, ``state_dict``."""

    def __init__(
        self,
        split: FileSplit,
        cfg: DataConfig,
        batch_size: int,
        device: torch.device,
        seed: int,
        channels_last: bool = True,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.split, self.cfg, self.batch_size, self.device = split, cfg, batch_size, device
        self.seed = seed % 2**32
        self.channels_last, self.rank, self.world = channels_last, rank, world
        # Each rank's shard has len // world files; the last partial batch is dropped.
        self.steps_per_epoch = (len(split) // world) // batch_size
        if self.steps_per_epoch < 1:
            raise UserError(
                f"data.batch_size={batch_size * world} is larger than the {len(split)} training images"
            )
        self.on_device = resolve_decode(cfg, device)
        self.workers = loader_workers(cfg, world)
        self.colour = ColourNormalize(device=device)
        self.batches = _TrainBatches(
            split,
            batch_size,
            cfg.image_size,
            self.seed,
            rank,
            world,
            raw=self.on_device,
            interpolation=cfg.interpolation.value,
        )
        self.epoch, self.pos = 0, 0
        self.skipped: list[str] = []
        self._it: Iterator[_Batch] | None = None

    def _start(self) -> Iterator[_Batch]:
        keys = _Keys(self.epoch, self.pos, self.steps_per_epoch)
        return iter(_data_loader(self.batches, keys, self.workers, self.device))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        if self.pos == self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        b = next(self._it)
        assert b.key == (self.epoch, self.pos), (b.key, self.epoch, self.pos)
        self.pos += 1
        labels = b.labels
        if self.on_device:
            images = _decode_here(self.split, b.images, b.index, b.bad, self.device)
            labels = substitute(images, labels)
            self._check(b.bad, len(images))
            x, colour = augment_batch(
                images,
                b.index,
                self.seed,
                self.epoch,
                self.cfg.image_size,
                self.batches.interpolation,
            )
        else:
            self._check(b.bad, len(labels))
            x, colour = b.images.to(self.device, non_blocking=True), b.colour
        x = self.colour(x, colour.to(self.device, torch.float32, non_blocking=True))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt), labels.to(self.device, non_blocking=True)

    def _check(self, bad: list[Bad], n: int) -> None:
        if not bad:
            return
        policy_check(bad, self.cfg.bad_images, n)
        for path, reason in bad:
            log.warning(
                "skipped unreadable image %s (%s); a copy of another image of the batch "
                "takes its place", path, reason
            )  # fmt: skip
            if path not in self.skipped:
                self.skipped.append(path)

    def report(self) -> dict[str, Any]:
        """For summary.json: how many training images could not be read."""
        return {"skipped_images": len(self.skipped)} if self.skipped else {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.skipped = list(state.get("skipped", []))
        self._it = None  # the workers restart at the saved position


def _data_loader(dataset, keys, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # each key is a whole batch
        sampler=keys,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=_quiet_worker if workers else None,
        collate_fn=_as_is,
    )


def _as_is(batch: Any) -> Any:
    return batch


def _decode_here(
    split: FileSplit, packed: Packed, index: np.ndarray, bad: list[Bad], device: torch.device
) -> list:
    """A batch read raw by the workers, decoded on ``device``; failures are added to ``bad``
    and their places hold ``None``."""
    images, failed = decode_on_device(packed.items(), device)
    bad += [(split.path(int(index[i])), "cannot decode") for i in failed]
    return images


# --- evaluation --------------------------------------------------------------


@dataclass
class _EvalBatch:
    views: Any  # list of uint8 (B,3,c,c) per crop, or (device decode) the raw items, Packed
    labels: torch.Tensor
    index: np.ndarray
    bad: list[Bad]

    def pin_memory(self) -> _EvalBatch:
        if isinstance(self.views, list) and all(isinstance(v, torch.Tensor) for v in self.views):
            self.views = [v.pin_memory() if v.dim() == 4 else v for v in self.views]
        return self


class _EvalBatches(torch.utils.data.Dataset):
    def __init__(
        self,
        split: FileSplit,
        batches: list[np.ndarray],
        crops: list[int],
        ratio: float,
        raw: bool,
        interpolation: str = "bicubic",
    ) -> None:
        self.split, self.batches, self.crops, self.ratio, self.raw = (
            split,
            batches,
            crops,
            ratio,
            raw,
        )
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> _EvalBatch:
        index = self.batches[b]
        items, bad = read_all([self.split.path(int(i)) for i in index], self.raw)
        labels = _uncounted(items, self.split.labels[index].clone())
        if self.raw:
            return _EvalBatch(Packed.of(items), labels, index, bad)
        views = eval_views(items, self.crops, self.ratio, self.interpolation)
        return _EvalBatch(views, labels, index, bad)


def _uncounted(items: list, labels: torch.Tensor) -> torch.Tensor:
    """-1 (not counted) in place of each failed image's label."""
    for k, item in enumerate(items):
        if item is None:
            labels[k] = -1
    return labels


def eval_views(
    items: list, crops: list[int], ratio: float, interpolation: str = "bicubic"
) -> list[torch.Tensor]:
    """Per crop size, the batch's centre crops (a failed image's place holds zeros)."""
    per_image = [
        centre_crops(img, crops, ratio, interpolation) if img is not None else None for img in items
    ]
    if all(v is None for v in per_image):
        return []  # the caller reports the batch's failures
    views = []
    for c in range(len(crops)):
        ref = next(v for v in per_image if v is not None)[c]
        views.append(
            torch.stack([v[c] if v is not None else torch.zeros_like(ref) for v in per_image])
        )
    return views


def eval_crops(cfg: DataConfig) -> list[int]:
    crops = list(cfg.eval_crops) or [cfg.image_size]
    if any(c < 1 for c in crops) or not 0 < cfg.eval_crop_ratio <= 1:
        raise UserError(
            f"data.eval_crops={crops} and data.eval_crop_ratio={cfg.eval_crop_ratio}: crops must be "
            f"positive sizes and the ratio in (0, 1] (0.875: 224 of 256)"
        )
    return crops


def crop_suffix(crops: list[int], c: int) -> str:
    """Metric name suffix of a test crop: none for the first, ``_320`` for another."""
    return "" if c == 0 else f"_{crops[c]}"


def stream_eval_batches(
    split: FileSplit,
    cfg: DataConfig,
    device: torch.device,
    channels_last: bool = True,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """This rank's every world-th test image, as ``{suffix: batch}`` per crop, and labels
    (-1 where an image could not be read and ``data.bad_images=skip``)."""
    crops = eval_crops(cfg)
    mine = np.arange(rank, len(split), world)
    size = cfg.eval_batch_size
    batches = [mine[i : i + size] for i in range(0, len(mine), size)]
    on_device = resolve_decode(cfg, device)
    workers = loader_workers(cfg, world)
    interpolation = cfg.interpolation.value
    dataset = _EvalBatches(split, batches, crops, cfg.eval_crop_ratio, on_device, interpolation)
    norm = ColourNormalize(device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for b in _data_loader(dataset, range(len(batches)), workers, device):
        labels = b.labels
        if on_device:
            images = _decode_here(split, b.views, b.index, b.bad, device)
            labels = _uncounted(images, labels)
            views = eval_views(images, crops, cfg.eval_crop_ratio, interpolation)
        else:
            views = b.views
        if b.bad:
            policy_check(b.bad, cfg.bad_images, len(labels))
            for path, reason in b.bad:
                log.warning("test image %s not evaluated: %s", path, reason)
        yield (
            {
                crop_suffix(crops, c): norm(v.to(device, non_blocking=True)).contiguous(
                    memory_format=fmt
                )
                for c, v in enumerate(views)
            },
            labels.to(device, non_blocking=True),
        )
