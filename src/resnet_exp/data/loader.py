"""Batches served from a uint8 tensor that lives on the training device.

Hand-written on purpose: a DataLoader with PIL transforms in worker processes
costs a host-side crop/flip/normalise per image and a host-to-device copy per
step, which on a GPU is slower than the ResNet-20 step itself. Here one
gather per batch does crop and flip for all images at once, on the device,
and nothing waits on the host.

The crop's padding is the data set's mean colour by default (``pad_value=
"mean"``): fb.resnet.torch normalises first and then zero-pads
(datasets/cifar10.lua:45-49, transforms.lua:66-73), so its border is 0 after
normalisation. ``"zero"`` pads the raw image with black.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from resnet_exp.data.splits import Split


class Normalize:
    """uint8 -> float, minus the per-channel mean, over the per-channel std."""

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
    ) -> None:
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, -1, 1, 1) / std_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Elementwise ops keep x's memory format (channels_last stays so).
        return torch.addcmul(self.shift, x.float(), self.scale)


PAD_VALUES = ("mean", "zero")


def crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``pad``-pixel-padded crop and horizontal flip of every image, in one gather.

    The padding is zeros of ``x``'s dtype: black for uint8 images, the mean
    colour for normalised ones.

    Returns an NCHW view with channels_last strides (the gather yields NHWC).
    """
    b, _, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=gen)
    flip = torch.randint(0, 2, (b, 1), device=dev, generator=gen).bool()
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy + ar_h  # (b, h)
    cols = dx + torch.where(flip, ar_w.flip(0), ar_w)  # (b, w), reversed where flipped
    out = xp[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


class TrainLoader:
    """Endless shuffled training batches; ``state_dict`` captures the exact position.

    Each epoch is a fresh permutation drawn on the host (one small copy per
    epoch); crops and flips are drawn on the device. With ``world > 1`` each
    rank takes every ``world``-th index of the same permutation, so the ranks
    together see each image once per epoch.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        normalize: Normalize,
        device: torch.device,
        seed: int,
        augment: bool = True,
        pad: int = 4,
        channels_last: bool = True,
        rank: int = 0,
        world: int = 1,
        pad_value: str = "mean",
    ) -> None:
        if pad_value not in PAD_VALUES:
            raise ValueError(f"pad_value={pad_value!r} is not one of {', '.join(PAD_VALUES)}")
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.normalize, self.device = batch_size, normalize, device
        self.augment, self.pad, self.channels_last = augment, pad, channels_last
        self.pad_value = pad_value
        self.rank, self.world, self.seed = rank, world, seed
        # Drop the last partial batch: constant shapes suit cudnn autotuning and compiled graphs.
        self.steps_per_epoch = len(split) // (batch_size * world)
        self.order_gen = torch.Generator().manual_seed(seed)
        # One permutation for all ranks; each rank draws its own crops and flips.
        self.aug_gen = torch.Generator(device=device).manual_seed(seed + 1 + rank)
        self.epoch, self.pos = 0, 0
        self.perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        perm = torch.randperm(len(self.labels), generator=self.order_gen)
        return perm[self.rank :: self.world].to(self.device, non_blocking=True)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos == self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
            self.perm = self._permutation()
        idx = self.perm[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
        self.pos += 1
        x = self.images[idx]
        if not self.augment:
            x = self.normalize(x)
        elif self.pad_value == "mean":  # normalise, then zero-pad: the border is the mean
            x = crop_flip(self.normalize(x), self.pad, self.aug_gen)
        else:  # black border, then normalise
            x = self.normalize(crop_flip(x, self.pad, self.aug_gen))
        x = x.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )
        return x, self.labels[idx]

    def report(self) -> dict[str, Any]:
        return {}  # every image is in memory: nothing to report

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "perm": self.perm.cpu(),
            "order_gen": self.order_gen.get_state(),
            "aug_gen": self.aug_gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved position; augmentation draws saved on a device of another type (a
        CUDA generator's state is no CPU generator's) or for another rank (``None``)
        continue from a generator seeded from the seed, the rank and the position."""
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.perm = state["perm"].to(self.device)
        self.order_gen.set_state(state["order_gen"])
        base = self.seed + 1 + self.rank
        restore_draws(self.aug_gen, state.get("aug_gen"), base, self.epoch, self.pos)


def restore_draws(
    gen: torch.Generator, saved: torch.Tensor | None, base: int, epoch: int, pos: int
) -> None:
    """A per-rank augmentation generator continued: its saved state where it fits, else
    (a state of another device type, or ``None``: saved for another rank) seeded from
    ``base`` (the seed and the rank) and the loader's position (``epoch``, ``pos``)."""
    if saved is not None and saved.numel() == gen.get_state().numel():
        gen.set_state(saved)
    else:
        gen.manual_seed((base * 1_000_003 + epoch * 100_003 + pos) % 2**63)


def eval_batches(
    split: Split, batch_size: int, normalize: Normalize, device: torch.device, channels_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, unaugmented (the paper tests on the original image)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i in range(0, len(split), batch_size):
        x = split.images[i : i + batch_size].to(device, non_blocking=True)
        yield (
            normalize(x).contiguous(memory_format=fmt),
            split.labels[i : i + batch_size].to(device),
        )
