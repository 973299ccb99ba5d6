"""Data sets as uint8 tensors: CIFAR-10/100, any image folder, synthetic.

Every source decodes once into ``(N, 3, H, W)`` uint8 images and int64
labels; augmentation happens later, on the training device (loader.py).
Decoded image folders are cached on disk, since decoding 60k JPEGs costs
seconds that every run would otherwise pay again.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnet_exp.config import DataConfig
from resnet_exp.data.loader import Normalize, TrainLoader, eval_batches
from resnet_exp.data.splits import (
    SPLIT_SEED,
    Placement,
    Split,
    Splits,
    check_limits,
    check_same_classes,
    limit,
)
from resnet_exp.errors import UserError


class InMemorySource(Splits[Split]):
    """Decoded images, batched on the training device (``loader.py``)."""

    def train_loader(self, batch_size: int, seed: int, at: Placement) -> TrainLoader:
        cfg = self.cfg
        return TrainLoader(
            self.train,
            batch_size,
            Normalize(self.mean, self.std, at.device),
            at.device,
            seed,
            augment=cfg.augment,
            pad=cfg.pad,
            pad_value=cfg.pad_value.value,
            channels_last=at.channels_last,
            rank=at.rank,
            world=at.world,
        )

    def eval_names(self) -> list[str]:
        return [""]  # the original image only (the paper tests on it)

    def eval_batches(
        self, split: Split, at: Placement
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        if at.world > 1:
            split = split.subset(torch.arange(at.rank, len(split), at.world))
        normalize = Normalize(self.mean, self.std, at.device)
        for x, y in eval_batches(
            split, self.cfg.eval_batch_size, normalize, at.device, at.channels_last
        ):
            yield {"": x}, y


# torchvision is imported only where a data set needs it: importing it takes
# seconds (it loads torch's compiler stack), which synthetic and dry runs skip.
CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "CIFAR-10"),
    "cifar100": ("CIFAR100", "cifar-100-python", "CIFAR-100"),
}
SOURCES = ("cifar10", "cifar100", "imagefolder", "imagenet", "synthetic")
DATA_ENV = "RESNET_EXP_DATA"  # data.root's default (config.py), the Makefile's data folder


def load_in_memory(cfg: DataConfig) -> InMemorySource:
    """The data set, decoded: CIFAR, an image folder or synthetic images."""
    if cfg.name in CIFAR:
        train, test, classes, source = _load_cifar(cfg)
    elif cfg.name == "imagefolder":
        train, test, classes = _load_folder_splits(Path(cfg.root), cfg)
        source = f"image folders in {cfg.root}"
    elif cfg.name == "synthetic":
        train, test, classes = _synthetic(cfg)
        source = "synthetic"
    else:
        raise UserError(f"data.name={cfg.name!r} is not one of {', '.join(SOURCES)}")
    return _finish(train, test, classes, source, cfg)


def _finish(
    train: Split, test: Split, classes: list[str], source: str, cfg: DataConfig
) -> InMemorySource:
    check_limits(cfg)
    if cfg.val_size < 0 or cfg.val_size >= len(train):
        raise UserError(
            f"data.val_size={cfg.val_size} must be in [0, {len(train) - 1}] for {len(train)} training images"
        )
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(train), generator=gen)
    val = train.subset(order[: cfg.val_size].sort().values) if cfg.val_size else None
    keep = order[cfg.val_size :]
    if cfg.train_limit is not None:
        keep = keep[: cfg.train_limit]
    train = train.subset(keep.sort().values)
    test = limit(test, cfg.test_limit, gen)
    mean, std = channel_stats(train.images)
    return InMemorySource(train, test, val, classes, mean, std, source, cfg)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units.

    From a 256-bin histogram per channel: exact, and no float copy of the data set.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].flatten(), minlength=256).double()
        n = hist.sum()
        mean = (hist @ values) / n
        var = (hist @ (values - mean) ** 2) / (n - 1)
        means.append(mean.item())
        stds.append(var.sqrt().item())
    return tuple(means), tuple(stds)


# --- CIFAR -------------------------------------------------------------------


FOLDERS, BATCHES = "folders", "batches"  # the two layouts of a CIFAR copy


def find_cifar(name: str, root: Path) -> tuple[str, Path] | None:
    """Which layout of CIFAR ``name`` lies in ``root``, and the root to load it from:
    ``folders`` (train/ + test/ class folders) or ``batches`` (torchvision's
    cifar-10-batches-py/ or cifar-100-python/, or ``root`` pointing at it); None: neither."""
    folder = CIFAR[name][1]
    if root.name == folder:  # pointed at the batches folder itself
        root = root.parent
    if (root / "train").is_dir() and (root / "test").is_dir():
        return FOLDERS, root
    if (root / folder).is_dir():
        return BATCHES, root
    return None


def root_origin() -> str:
    """Where data.root's default comes from, as it is here."""
    env = os.environ.get(DATA_ENV)
    return f"{DATA_ENV}={env}" if env else f"{DATA_ENV} is unset"


def named_root(root: Path) -> str:
    """``data.root='DIR'``, with the folder it names when DIR is relative."""
    return f"data.root={str(root)!r}" + ("" if root.is_absolute() else f" ({root.resolve()})")


def missing_cifar(name: str, root: Path) -> str:
    """The one line for a CIFAR copy that is not in ``root``: where it looked, where
    ``root`` came from, and the command that stages a copy."""
    folder, title = CIFAR[name][1:]
    return (
        f"no {title} in {named_root(root)} (expected {folder}/ or train/ + test/ folders; "
        f"{root_origin()}); pass data.root=DIR holding one of them, or data.download=true, or stage "
        f"it on a machine with internet: resnet-exp-data download {root} --dataset {name}"
    )


def _load_cifar(cfg: DataConfig) -> tuple[Split, Split, list[str], str]:
    import torchvision.datasets

    name, folder, title = CIFAR[cfg.name]
    cls = getattr(torchvision.datasets, name)
    found = find_cifar(cfg.name, Path(cfg.root))
    root = found[1] if found else Path(cfg.root)
    if found and found[0] == FOLDERS:
        train, test, classes = _load_folder_splits(root, cfg)
        return train, test, classes, f"{title} image folders in {root}"
    if found is None:
        if not cfg.download:
            raise UserError(missing_cifar(cfg.name, root))
        download_cifar(cfg.name, root)
    try:
        splits = [cls(str(root), train=t, download=False) for t in (True, False)]
    except RuntimeError as e:  # torchvision's integrity check
        raise UserError(
            f"{title} in {root / folder} is unreadable ({e}); delete it and download again"
        ) from e
    train, test = (
        Split(
            torch.from_numpy(np.ascontiguousarray(s.data.transpose(0, 3, 1, 2))),
            torch.tensor(s.targets, dtype=torch.int64),
        )
        for s in splits
    )
    return train, test, list(splits[0].classes), f"{title} ({folder}) in {root}"


def download_cifar(name: str, root: Path) -> None:
    """torchvision's download of CIFAR ``name`` into ``root`` (checked, extracted)."""
    import torchvision.datasets

    cls, title = getattr(torchvision.datasets, CIFAR[name][0]), CIFAR[name][2]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"could not download {title} into data.root={str(root)!r} ({reason}); "
            f"offline? pass data.root=DIR holding an existing copy, or stage one on a machine "
            f"with internet: resnet-exp-data download {root} --dataset {name}"
        ) from e


# --- image folders -----------------------------------------------------------


def _load_folder_splits(root: Path, cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise UserError(
            f"data.root={str(root)!r} needs train/ and test/ folders of class subfolders"
        )
    train, classes = load_folder(root / "train", cfg.image_size, cfg.cache_dir)
    test, test_classes = load_folder(root / "test", cfg.image_size, cfg.cache_dir)
    check_same_classes(classes, test_classes, root, "test", "classes")
    return train, test, classes


def load_folder(folder: Path, size: int, cache_dir: str | None = None) -> tuple[Split, list[str]]:
    """Decode ``folder/<class>/*`` into uint8 ``size`` x ``size`` images, cached on disk."""
    classes, samples = list_images(folder)
    cache = _cache_path(folder, size, samples, cache_dir)
    if cache is not None and cache.exists():
        try:
            images, labels = torch.load(cache, weights_only=True)
            return Split(images, labels), classes
        except Exception:
            pass  # a broken cache is rebuilt below
    images = _decode_all([p for p, _ in samples], size)
    labels = torch.tensor([c for _, c in samples], dtype=torch.int64)
    if cache is not None:
        _write_cache(cache, images, labels)
    return Split(images, labels), classes


def list_images(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes of ``folder/<class>/*`` and its (image path, class index) pairs."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"no images in {folder}: needs class subfolders holding image files") from e
    return classes, samples


def _cache_path(folder: Path, size: int, samples: list, cache_dir: str | None) -> Path | None:
    if not cache_dir:
        return None
    # Keyed by the folder, the image size, the file list and the class folders' mtimes.
    key = hashlib.sha1()
    key.update(f"{folder.resolve()}|{size}|{len(samples)}".encode())
    for d in sorted({os.path.dirname(p) for p, _ in samples}):
        key.update(f"{d}:{os.stat(d).st_mtime_ns}".encode())
    key.update("".join(p for p, _ in samples[:: max(1, len(samples) // 100)]).encode())
    return Path(cache_dir) / f"{folder.name}-{size}px-{key.hexdigest()[:16]}.pt"


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save((images, labels), tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache is an optimisation; an unwritable one is not an error


def _decode_all(paths: list[str], size: int) -> torch.Tensor:
    from torchvision.datasets.folder import pil_loader
    from torchvision.transforms.v2 import functional as TF

    def decode(path: str) -> torch.Tensor:
        try:
            img = pil_loader(path)
        except (OSError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot decode image {path}: {e}") from e
        if img.size != (size, size):
            img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    # PIL's decoders release the GIL, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        images = list(pool.map(decode, paths, chunksize=256))
    return torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)


# --- synthetic ---------------------------------------------------------------


def _synthetic(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    """Each class is a smooth random colour pattern; samples add noise and a shift.

    Learnable but not trivial, so a smoke run shows the loss falling.
    """
    k = cfg.num_classes or 10
    if k < 2:
        raise UserError(f"data.num_classes={k} must be at least 2")
    s = cfg.image_size
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    protos = torch.nn.functional.interpolate(
        torch.rand(k, 3, 4, 4, generator=gen), size=(s, s), mode="bilinear"
    )

    def make(n: int) -> Split:
        labels = torch.randint(0, k, (n,), generator=gen)
        noise = torch.randn(n, 3, s, s, generator=gen) * 0.25
        images = (protos[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
        return Split(images, labels)

    return make(cfg.synthetic_train), make(cfg.synthetic_test), [f"class{i}" for i in range(k)]
