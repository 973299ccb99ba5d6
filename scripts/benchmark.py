#!/usr/bin/env python
"""Training speed and memory: the trainer's own step against a textbook PyTorch loop.

The run is described with the same Hydra overrides as ``resnet-exp`` (composed
with Hydra's compose API), and the trainer is built as for a run: the timed step
is ``Trainer.train_step`` (loader, step, schedule, device-side metrics).

Each measurement runs in a fresh subprocess (so peak memory is its own):
warm-up steps are excluded, then ``--repeats`` timed windows of ``--steps``
steps; the median images/s is reported, with time per step, time per
50k-image epoch and peak memory (CUDA max allocated on a GPU, peak RSS on the
CPU). The reference is what a user would write instead: torchvision
ImageFolder/CIFAR10 + DataLoader workers doing RandomCrop(32, 4),
RandomHorizontalFlip, ToTensor, Normalize; fp32, contiguous tensors, the same
model, batch size and SGD settings.

    python scripts/benchmark.py --preset cpu                        # synthetic images
    python scripts/benchmark.py --preset gpu dataset=cifar10 data.root=DIR data.download=false
    python scripts/benchmark.py depth=1001 block=preact --variant "trainer.precision=bf16" \\
        --variant "trainer.precision=bf16 trainer.cuda_graphs=false" --no-reference
    python scripts/benchmark.py --preset signal      # the cost of trainer.track_signal_every=100

Positional arguments are overrides for every measurement (with ``--preset``, added
to each of its nets); ``--variant`` is a space-separated set of overrides measured
against the others (``default``: none). Results go to --out (benchmark.md, benchmark.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchtools import compose, device_name, markdown, peak_memory_mb, run_worker, write_results  # noqa: E402

EPOCH_IMAGES = 50_000
# Synthetic images unless the overrides name a data set; a few test images (no evaluation).
BASE = [
    "dataset=synthetic",
    "data.synthetic_train=10000",
    "data.synthetic_test=10",
    "data.test_limit=10",
    "trainer.progress=false",
]

PRESETS: dict[str, dict[str, Any]] = {
    # What docs/performance.md reports for each kind of machine.
    "cpu": {
        "models": ["block=original depth=20", "block=original depth=110", "block=preact depth=164"],
        # bf16 on a CPU without native bf16 runs ~10x slower than fp32 (docs/performance.md):
        # measure it with depth=20 --variant trainer.precision=bf16, not at every depth.
        "variants": ["default", "trainer.precision=fp32 trainer.channels_last=false"],
        "steps": 5,
        "warmup": 3,
    },
    "gpu": {
        "models": [
            "block=original depth=20",
            "block=original depth=56",
            "block=original depth=110",
            "block=preact depth=1001",
        ],
        "variants": [
            "default",
            "trainer.cuda_graphs=false",
            "trainer.precision=fp32 trainer.channels_last=false trainer.cuda_graphs=false",
        ],
        "steps": 20,
        "warmup": 10,
    },
    # scripts/gpu_check.py: the paper's nets at batch 64, the default path against the reference.
    "gpu-check": {
        "models": [
            "block=original depth=20",
            "block=original depth=110",
            "block=preact depth=164",
            "block=preact depth=1001",
        ],
        "variants": ["default"],
        "steps": 20,
        "warmup": 10,
    },
    # The cost of trainer.track_signal_every=100 (docs/gradient-flow.md): ResNet-110 at
    # batch 128 on the CPU, without and with, twice in turn; a 100-step window holds one
    # measurement.
    "signal": {
        "models": ["block=preact depth=110 trainer.device=cpu"],
        "variants": ["default", "trainer.track_signal_every=100"],
        "rounds": 2,
        "steps": 100,
        "warmup": 2,
        "repeats": 1,
        "reference": False,
    },
    # gpu_check.py --dry: the same table with tiny nets on the CPU.
    "dry": {
        "models": ["block=original depth=8", "block=preact depth=11"],
        "variants": ["default"],
        "steps": 2,
        "warmup": 1,
    },
}


def variant_overrides(variant: str) -> list[str]:
    return [] if variant in ("", "default") else shlex.split(variant)


# --- workers (run in a subprocess each) ----------------------------------------


def measure(step, device: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``step`` (warm-up excluded) and read the peak memory it reached."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return {
        "windows_s": time_windows(step, sync, args.warmup, args.steps, args.repeats),
        "peak_memory_mb": peak_memory_mb(device),
        "device_name": device_name(device),
    }


def time_windows(step, sync, warmup: int, steps: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    windows = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        windows.append(time.perf_counter() - t)
    return windows


def project_worker(args: argparse.Namespace) -> dict[str, Any]:
    """resnet-exp's own path: the trainer built as for a run, timing its own step."""
    import torch

    from resnet_exp.train.context import resolve
    from resnet_exp.train.loop import Trainer
    from resnet_exp.train.step import CudaGraphStep

    cfg = compose(args.overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, resolve(cfg, Path(run_dir)))
        s = trainer.s

        tracking: list[float] = []  # seconds each step spent measuring the signal

        def step() -> None:  # the loop's step, and the signal measured when it is due
            trainer.train_step()
            tracking.append(trainer.signal.after_step(trainer.step, trainer.records))

        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        t = cfg.trainer
        timed = measure(step, s.device, args)
        return {
            "kind": "resnet-exp",
            "batch": cfg.data.batch_size,
            "precision": s.precision.value,
            "channels_last": t.channels_last,
            "cuda_graphs": isinstance(s.train_step, CudaGraphStep),
            "compile": t.compile_mode if t.compile else "off",
            "checkpointing": cfg.model.checkpointing,
            **timed,
            # the share of the timed windows spent measuring the signal (records are off)
            "tracking_share": sum(tracking[args.warmup :]) / sum(timed["windows_s"]),
        }


def reference_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The textbook loop: per-image PIL transforms in DataLoader workers, fp32."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchvision
    import torchvision.transforms as T
    from PIL import Image

    from resnet_exp.data import is_streamed, load_dataset
    from resnet_exp.models import NetSpec
    from resnet_exp.run.runtime import pick_device

    cfg = compose(args.overrides)
    device = pick_device(cfg.trainer.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    stats = load_dataset(cfg.data)  # per-channel mean/std, as the project uses
    transform = T.Compose(
        [
            T.RandomCrop(cfg.data.image_size, padding=cfg.data.pad),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(stats.mean, stats.std),
        ]
    )
    root = Path(cfg.data.root)
    if cfg.data.name == "synthetic":
        images = stats.train.images.permute(0, 2, 3, 1).numpy()
        labels = stats.train.labels.tolist()

        class InMemory(torch.utils.data.Dataset):  # what torchvision's CIFAR10 does per item
            def __len__(self) -> int:
                return len(labels)

            def __getitem__(self, i: int):
                return transform(Image.fromarray(np.asarray(images[i]))), labels[i]

        dataset = InMemory()
    elif (root / "cifar-10-batches-py").is_dir():
        dataset = torchvision.datasets.CIFAR10(str(root), train=True, transform=transform)
    else:
        dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    workers = min(args.workers, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    net = NetSpec.from_config(cfg.model, cfg.depth, is_streamed(cfg.data))
    model = net.build(stats.num_classes).to(device)
    o = cfg.optimizer
    optimizer = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [32_000, 48_000], 0.1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = iter(loader)

    def step() -> None:
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    return {
        "kind": "reference",
        "batch": cfg.data.batch_size,
        "precision": "fp32",
        "channels_last": False,
        "cuda_graphs": False,
        "compile": "off",
        "checkpointing": 0,
        "workers": workers,
        **measure(step, device, args),
    }


# --- driver ----------------------------------------------------------------------


def measure_in_subprocess(
    args: argparse.Namespace, model: str, variant: str | None, overrides: list[str]
) -> dict[str, Any]:
    kind = "reference" if variant is None else "project"
    result = run_worker(
        __file__,
        [kind, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        + ["--repeats", str(args.repeats), "--workers", str(args.workers), *overrides],
    )
    result.update(model=model, variant=variant or "reference")
    if "error" in result:
        return result
    step_s = statistics.median(result["windows_s"]) / args.steps
    batch = result["batch"]
    result.update(
        images_per_s=batch / step_s,
        ms_per_step=1000 * step_s,
        epoch_s=EPOCH_IMAGES / (batch / step_s),
    )
    return result


COLUMNS = [
    "model", "variant", "precision", "channels_last", "CUDA graphs", "compile", "ckpt",
    "images/s", "ms/step", "s/epoch (50k)", "peak memory (MB)", "vs reference",
]  # fmt: skip


def cells(r: dict[str, Any]) -> list[str]:
    return [
        r["model"],
        r["variant"],
        r["precision"],
        "on" if r["channels_last"] else "off",
        "on" if r["cuda_graphs"] else "off",
        r["compile"],
        str(r["checkpointing"] or "—"),
        f"{r['images_per_s']:,.0f}",
        f"{r['ms_per_step']:.1f}",
        f"{r['epoch_s']:.1f}",
        f"{r['peak_memory_mb']:,.0f}",
        f"{r['ratio']:.2f}x" if r.get("ratio") else "—",
    ]


def table(rows: list[dict[str, Any]]) -> str:
    return markdown(COLUMNS, rows, cells, keys=["model", "variant"])


def tracking_note(rows: list[dict[str, Any]]) -> str:
    """Of the runs that tracked the signal: the share of their time spent measuring it."""
    shares = [
        f"{r['variant']}: {100 * r['tracking_share']:.2f}%" for r in rows if r.get("tracking_share")
    ]
    return (
        f"\nTime spent measuring the signal (within the windows): {'; '.join(shares)}\n"
        if shares
        else ""
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. depth=110 block=original")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument(
        "--variant", action="append", help="overrides measured against the others (repeatable)"
    )
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int, help="timed windows per measurement (default 3)")
    p.add_argument(
        "--workers", type=int, default=4, help="DataLoader workers of the reference loop"
    )
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--out", default=f"outputs/bench/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    p.add_argument("--worker", choices=["project", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()

    preset = PRESETS.get(args.preset or "", {})
    args.steps = args.steps or preset.get("steps", 10)
    args.repeats = args.repeats or preset.get("repeats", 3)
    args.warmup = args.warmup if args.warmup is not None else preset.get("warmup", 5)
    if args.worker:
        worker = project_worker if args.worker == "project" else reference_worker
        print(json.dumps(worker(args)))
        return

    models = preset.get("models") or [""]
    variants = args.variant or preset.get("variants") or ["default"]
    for m in models:  # fail on a typo before measuring anything
        for v in variants:
            compose([*BASE, *shlex.split(m), *args.overrides, *variant_overrides(v)])
    rows: list[dict[str, Any]] = []
    for model in models:
        common = [*BASE, *shlex.split(model), *args.overrides]
        label = " ".join([*shlex.split(model), *args.overrides]) or "default"
        skip = args.no_reference or not preset.get("reference", True)
        ref = None if skip else measure_in_subprocess(args, label, None, common)
        group = [ref] if ref else []
        for variant in variants * preset.get("rounds", 1):  # in turn: the machine's drift
            overrides = [*common, *variant_overrides(variant)]
            group.append(measure_in_subprocess(args, label, variant, overrides))
        for r in group:
            if ref and "error" not in ref and "error" not in r and r is not ref:
                r["ratio"] = r["images_per_s"] / ref["images_per_s"]
            print(table([r]).splitlines()[-1], flush=True)
        rows += group
    device = next((r["device_name"] for r in rows if "device_name" in r), "?")
    text = (
        f"Device: {device}; overrides: {' '.join(args.overrides) or 'none'}; median of "
        f"{args.repeats} windows of {args.steps} steps after {args.warmup} warm-up steps.\n\n"
        f"{table(rows)}\n{tracking_note(rows)}"
    )
    payload = {"device": device, "overrides": args.overrides, "rows": rows}
    write_results(Path(args.out), "benchmark", text, payload)


if __name__ == "__main__":
    main()
