"""Data sources and the on-device loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from resnet_exp.config import DataConfig
from resnet_exp.data import Normalize, TrainLoader, crop_flip, load_dataset
from resnet_exp.data.sources import channel_stats
from resnet_exp.errors import UserError

from conftest import cifar10_root


def make_folder(root: Path, classes: dict[str, int], size: int = 32, split: str = "train") -> None:
    for i, (name, count) in enumerate(classes.items()):
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for j in range(count):
            Image.new("RGB", (size, size), (20 * i + j, 0, 255)).save(d / f"{j}.png")


def test_crop_flip_is_a_padded_crop_or_its_mirror() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = crop_flip(x, 2, gen)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        candidates = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], c) for c in candidates)
        mirrored = any(torch.equal(out[i], c.flip(-1)) for c in candidates)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 10 < flips < 54  # about half flipped


def test_normalize_uses_channel_stats() -> None:
    x = torch.randint(0, 256, (100, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref.mean(1))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref.std(1))
    out = Normalize(mean, std, torch.device("cpu"))(x)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def small_loader(seed: int = 0) -> TrainLoader:
    ds = load_dataset(
        DataConfig(name="synthetic", synthetic_train=100, synthetic_test=10, cache_dir="")
    )
    return TrainLoader(
        ds.train, 16, Normalize(ds.mean, ds.std, torch.device("cpu")), torch.device("cpu"), seed
    )


def test_loader_epochs_cover_each_image_once() -> None:
    loader = small_loader()
    assert loader.steps_per_epoch == 6  # 100 // 16: the partial batch is dropped
    seen = torch.cat([loader.perm[i * 16 : (i + 1) * 16] for i in range(6)])
    assert len(set(seen.tolist())) == 96
    first = loader.perm.clone()
    for _ in range(7):
        loader.next()
    assert loader.epoch == 1 and not torch.equal(first, loader.perm)


def test_loader_state_round_trip_gives_same_batches() -> None:
    a = small_loader()
    for _ in range(8):
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    b = small_loader(seed=123)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.next() for _ in range(5)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_imagefolder_loads_resizes_and_caches(tmp_path: Path) -> None:
    make_folder(tmp_path, {"cat": 3, "dog": 2}, size=40)
    make_folder(tmp_path, {"cat": 1, "dog": 1}, size=40, split="test")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    ds = load_dataset(cfg)
    assert ds.classes == ["cat", "dog"] and len(ds.train) == 5 and len(ds.test) == 2
    assert ds.train.images.shape == (5, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert sorted(ds.train.labels.tolist()) == [0, 0, 0, 1, 1]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    again = load_dataset(cfg)  # from the cache
    assert torch.equal(again.train.images, ds.train.images)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train/ and test/"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), cache_dir=""))
    make_folder(tmp_path, {"cat": 2, "dog": 2})
    make_folder(tmp_path, {"cat": 1, "bird": 1}, split="test")
    with pytest.raises(UserError, match="different classes.*bird"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), cache_dir=""))
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "test" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_dataset(DataConfig(name="imagefolder", root=str(empty), cache_dir=""))


def test_limits_and_validation_split() -> None:
    cfg = DataConfig(
        name="synthetic",
        synthetic_train=1000,
        synthetic_test=200,
        cache_dir="",
        val_size=100,
        train_limit=300,
        test_limit=50,
    )
    ds = load_dataset(cfg)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (300, 100, 50)
    assert ds.eval_name == "val"
    # The validation images are not among the training images.
    train_rows = {tuple(r.tolist()) for r in ds.train.images.flatten(1)[:, :64]}
    assert not any(tuple(r.tolist()) in train_rows for r in ds.val.images.flatten(1)[:, :64])


def test_missing_cifar_without_download_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no CIFAR-10 in data.root=.*data.download=true"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "none"), download=False))


def test_cifar_download_offline_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download path runs up to the network call; offline it fails with a one-line error."""
    import urllib.request

    # A proxy on a closed local port makes the download fail at once, network or not.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setattr(urllib.request, "_opener", None)  # built anew, with the proxy
    with pytest.raises(UserError) as info:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "dl"), download=True))
    assert "could not download CIFAR-10 into data.root=" in str(info.value)
    assert "offline?" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.skipif(cifar10_root() is None, reason="no CIFAR-10 copy on this machine")
def test_real_cifar10_copy(cache_dir: Path) -> None:
    ds = load_dataset(
        DataConfig(
            name="cifar10", root=str(cifar10_root()), cache_dir=str(cache_dir), test_limit=100
        )
    )
    assert len(ds.train) == 50_000 and ds.num_classes == 10
    assert ds.classes[0] == "airplane" and ds.train.images.shape[1:] == (3, 32, 32)
    assert 0.45 < ds.mean[0] < 0.52 and 0.2 < ds.std[0] < 0.3  # CIFAR-10's red channel
