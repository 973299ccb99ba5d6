"""Reading and decoding image files for the streamed path, and what a file that
cannot be read does to its batch (``data.bad_images``)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from resnet_exp.config import BadImage
from resnet_exp.errors import UserError

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they
# are what this path is built on (decode_jpeg on CUDA included), so say it once, here.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

JPEG_MAGIC = b"\xff\xd8"
Bad = tuple[str, str]  # (path, reason)


def decode_file(path: str) -> torch.Tensor:
    """uint8 CHW RGB (greyscale and CMYK JPEGs, PNGs and the like converted)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(path), mode=ImageReadMode.RGB)


def read_raw(path: str) -> torch.Tensor:
    """A JPEG's bytes (decoded later, on the device); any other file decoded here."""
    from torchvision.io import read_file

    data = read_file(path)
    if bytes(data[:2].tolist()) == JPEG_MAGIC:
        return data
    return decode_file(path)


def read_all(paths: list[str], raw: bool) -> tuple[list[Any], list[Bad]]:
    """Each file decoded (``raw``: a JPEG's bytes, see ``read_raw``), ``None`` where it
    failed, and the failures."""
    read = read_raw if raw else decode_file
    items: list[Any] = []
    bad: list[Bad] = []
    for path in paths:
        try:
            items.append(read(path))
        except (RuntimeError, OSError, ValueError) as e:
            items.append(None)
            text = str(e).strip()
            bad.append((path, text.splitlines()[0] if text else type(e).__name__))
    return items, bad


@dataclass
class Packed:
    """A batch's raw items (JPEG bytes, or images another format had decoded) in ONE uint8
    tensor, as the DataLoader's workers send it: every tensor crosses to the main process
    through its own shared memory (a file descriptor each), so a list of per-image tensors
    would cost one per image and batch."""

    data: torch.Tensor  # the items' bytes, one after another
    shapes: list[tuple[int, ...] | None]  # each item's shape; None where it failed

    @classmethod
    def of(cls, items: list[Any]) -> Packed:
        parts = [it.reshape(-1) for it in items if it is not None]
        data = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        return cls(data, [None if it is None else tuple(it.shape) for it in items])

    def items(self) -> list[torch.Tensor | None]:
        """The items again: views of the one tensor."""
        out: list[torch.Tensor | None] = []
        at = 0
        for shape in self.shapes:
            if shape is None:
                out.append(None)
                continue
            n = math.prod(shape)
            out.append(self.data[at : at + n].view(shape))
            at += n
        return out


def decode_on_device(items: list, device: torch.device) -> tuple[list, list[int]]:
    """JPEG bytes -> uint8 images on ``device`` in one batched call (nvjpeg on CUDA);
    already decoded images are moved. Returns the images and the failed positions."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(items)
    jpeg = [i for i, it in enumerate(items) if it is not None and it.dim() == 1]
    for i, it in enumerate(items):
        if it is not None and it.dim() == 3:
            out[i] = it.to(device, non_blocking=True)
    failed: list[int] = [i for i, it in enumerate(items) if it is None]
    if jpeg:
        try:
            decoded = decode_jpeg([items[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, img in zip(jpeg, decoded):
                out[i] = img
        except RuntimeError:  # one bad file fails the batch: decode one by one, CPU as fallback
            for i in jpeg:
                try:
                    out[i] = decode_jpeg(items[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    try:
                        from torchvision.io import decode_image

                        out[i] = decode_image(items[i], mode=ImageReadMode.RGB).to(device)
                    except RuntimeError:
                        failed.append(i)
    return out, failed


def substitute(items: list, labels: torch.Tensor) -> torch.Tensor:
    """Fill each failed image's place with the next good one (same batch size);
    returns the labels to train on."""
    good = [i for i, it in enumerate(items) if it is not None]
    if not good:
        return labels
    labels = labels.clone()
    for i, it in enumerate(items):
        if it is None:
            j = next((g for g in good if g > i), good[0])
            items[i], labels[i] = items[j], labels[j]
    return labels


def policy_check(bad: list[Bad], policy: BadImage, n: int) -> None:
    """Stop the run on a failed file (``data.bad_images=fail``) or a batch of them."""
    if policy is BadImage.fail or len(bad) == n:
        path, reason = bad[0]
        hint = (
            "every image of a batch failed" if policy is BadImage.skip else
            "remove or replace it, or pass data.bad_images=skip to go on without it (logged and counted)"
        )  # fmt: skip
        raise UserError(f"cannot decode image {path} ({reason}); {hint}")
