"""Data-only throughput of the streamed (ImageNet) path: images/s with no model.

Makes an ImageNet-like folder of JPEGs once (train/ and val/, sizes around
ImageNet's average of ~400x350, varied aspect ratios), then times the
training loader (read, decode, random-sized crop to 224, flip, colour
jitter, lighting, normalise) and, with --eval, the test batches (224 and 320
centre crops from one decode).

    python scripts/data_throughput.py --root /tmp/imagenet-like --workers 2
    python scripts/data_throughput.py --root /tmp/imagenet-like --decode device   # the GPU path (on a GPU)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def make_folder(root: Path, train: int, val: int, classes: int, seed: int = 0) -> None:
    """Smooth random images with noise (JPEG sizes like photographs: ~30-80 kB)."""
    from torch.nn.functional import interpolate
    from torchvision.io import encode_jpeg, write_file

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            d = root / split / f"n{i % classes:08d}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(280, 420)), int(rng.integers(320, 500))
            base = torch.from_numpy(rng.random((1, 3, 8, 8), dtype=np.float32))
            img = interpolate(base, size=(h, w), mode="bicubic", align_corners=False)[0]
            img = img + torch.from_numpy(rng.normal(0, 0.08, (3, h, w)).astype(np.float32))
            img = (img.clamp(0, 1) * 255).to(torch.uint8)
            write_file(str(d / f"img{i:06d}.JPEG"), encode_jpeg(img, quality=90))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--train-images", type=int, default=2560)
    p.add_argument("--val-images", type=int, default=500)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=30, help="timed batches (after 2 warm-up ones)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--decode", choices=["workers", "device"], default="workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval", action="store_true", help="also time the 224+320 test batches")
    p.add_argument("--stages", action="store_true", help="ms per image of each stage, one thread")
    p.add_argument("--interpolation", choices=["bicubic", "bilinear"], default="bicubic")
    args = p.parse_args()

    from resnet_exp.config import DataConfig, Decode, Interpolation
    from resnet_exp.data.imagenet import load_streamed
    from resnet_exp.data.stream import StreamLoader, stream_eval_batches

    if not (args.root / "train").is_dir():
        t = time.perf_counter()
        make_folder(args.root, args.train_images, args.val_images, args.classes)
        print(f"made {args.root} in {time.perf_counter() - t:.0f} s")
    sizes = [os.path.getsize(p) for p in (args.root / "train").rglob("*.JPEG")]
    cfg = DataConfig(
        name="imagenet",
        root=str(args.root),
        image_size=224,
        eval_crops=[224, 320],
        eval_batch_size=args.batch,
        workers=args.workers,
        decode=Decode(args.decode),
        interpolation=Interpolation(args.interpolation),
    )
    data = load_streamed(cfg)
    device = torch.device(args.device)
    print(
        f"{len(data.train)} train images (mean {np.mean(sizes) / 1e3:.0f} kB), batch {args.batch}, "
        f"{args.workers} workers, decode={args.decode}, {args.interpolation}, device={device}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    if args.stages:
        stages(data.train, args.batch, args.interpolation)
    loader = StreamLoader(data.train, cfg, args.batch, device, seed=0)
    for _ in range(2):  # workers start, first batches
        loader.next()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(args.batches):
        x, y = loader.next()
    sync()
    dt = time.perf_counter() - t
    print(f"train: {args.batches * args.batch / dt:.0f} images/s ({tuple(x.shape)} {x.dtype})")
    if args.eval:
        t, n = time.perf_counter(), 0
        for _views, y in stream_eval_batches(data.test, cfg, device):
            n += len(y)
        sync()
        print(f"eval (224 + 320 crops): {n / (time.perf_counter() - t):.0f} images/s")


def stages(split, n: int, interpolation: str) -> None:
    """One thread, in this process: read, decode, crop+resize, colour+normalise."""
    from torchvision.io import decode_image, read_file

    from resnet_exp.data.augment import (
        ColourNormalize,
        centre_crops,
        crop_resize,
        image_rng,
        sample_train,
    )

    torch.set_num_threads(1)
    paths = [split.path(i) for i in range(n)]

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t) / n * 1e3

    raw, t_read = timed(lambda: [read_file(p) for p in paths])
    imgs, t_dec = timed(lambda: [decode_image(r) for r in raw])
    params = [sample_train(image_rng(0, 0, i), *im.shape[1:]) for i, im in enumerate(imgs)]
    crops, t_crop = timed(
        lambda: [crop_resize(im, p, 224, interpolation) for im, p in zip(imgs, params)]
    )
    x = torch.stack(crops)
    colour = torch.from_numpy(np.stack([p.colour for p in params])).float()
    _, t_col = timed(lambda: ColourNormalize()(x, colour))
    print(
        f"ms per image, one thread: read {t_read:.2f}, decode {t_dec:.2f}, "
        f"crop+resize {t_crop:.2f}, colour+normalise {t_col:.2f}"
    )
    # data.interpolation: both resizes in alternating rounds (a shared machine's load
    # drifts), the median of each, and the 224/320 test views' resizes too.
    per: dict[str, list[float]] = {"bicubic": [], "bilinear": []}
    test: dict[str, list[float]] = {"bicubic": [], "bilinear": []}
    for _ in range(5):
        for mode in per:
            per[mode].append(
                timed(lambda m=mode: [crop_resize(im, p, 224, m) for im, p in zip(imgs, params)])[1]
            )
            test[mode].append(
                timed(lambda m=mode: [centre_crops(im, [224, 320], 0.875, m) for im in imgs])[1]
            )
    print(
        "ms per image, one thread, median of 5 alternating rounds: "
        + ", ".join(
            f"{m}: train crop {np.median(per[m]):.2f}, test 224+320 {np.median(test[m]):.2f}"
            for m in per
        )
    )


if __name__ == "__main__":
    main()
