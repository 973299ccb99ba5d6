"""The interface both data paths implement, and the one place a run's path is chosen.

In memory (``sources.py``, ``loader.py``): images decoded once and batched on the
training device. Streamed (``imagenet.py``, ``stream.py``): a file list, read and
decoded per batch. The trainer, the evaluation and ``mode=eval`` see only
``DataSource`` and ``TrainBatches``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, Protocol, runtime_checkable

import torch

from resnet_exp.config import DataConfig
from resnet_exp.data.imagenet import load_streamed
from resnet_exp.data.sources import load_in_memory
from resnet_exp.data.splits import Placement

# ({crop name: normalised images}, labels; -1 for an image that is not counted)
EvalBatch = tuple[dict[str, torch.Tensor], torch.Tensor]


@runtime_checkable
class TrainBatches(Protocol):
    """Endless training batches whose ``state_dict`` is their exact position."""

    steps_per_epoch: int
    epoch: int
    pos: int

    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def report(self) -> dict[str, Any]:
        """What summary.json records of the data (e.g. images that could not be read)."""
        ...


@runtime_checkable
class DataSource(Protocol):
    """A data set's splits, its training batches and its evaluation batches."""

    train: Sized
    test: Sized
    val: Sized | None
    classes: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units: what the net's inputs are
    std: tuple[float, ...]  # normalised with
    source: str  # where the images come from, in words

    @property
    def num_classes(self) -> int: ...

    @property
    def eval_name(self) -> str: ...

    @property
    def eval_split(self) -> Sized: ...

    def train_loader(self, batch_size: int, seed: int, at: Placement) -> TrainBatches:
        """This rank's ``batch_size`` images per step of the training split."""
        ...

    def eval_names(self) -> list[str]:
        """The keys of each evaluation batch's views: "" for the first test crop."""
        ...

    def eval_batches(self, split: Any, at: Placement) -> Iterator[EvalBatch]:
        """This rank's share (every ``world``-th image) of one of this source's splits."""
        ...


def is_streamed(cfg: DataConfig) -> bool:
    """ImageNet always streams; any image folder does with ``data.stream=true``."""
    return cfg.name == "imagenet" or (cfg.name == "imagefolder" and cfg.stream)


def load_dataset(cfg: DataConfig) -> DataSource:
    """The data set ``cfg`` names: streamed from files, or decoded into memory."""
    return load_streamed(cfg) if is_streamed(cfg) else load_in_memory(cfg)
