#!/usr/bin/env python
"""Training speed and memory: resnet-exp's step against a textbook PyTorch loop.

Each measurement runs in a fresh subprocess (so peak memory is its own):
warm-up steps are excluded, then ``--repeats`` timed windows of ``--steps``
steps; the median images/s is reported, with time per step, time per
50k-image epoch and peak memory (CUDA max allocated on a GPU, peak RSS on the
CPU). The reference is what a user would write instead: torchvision
ImageFolder/CIFAR10 + DataLoader workers doing RandomCrop(32, 4),
RandomHorizontalFlip, ToTensor, Normalize; fp32, contiguous tensors, the same
model, batch size and SGD settings.

    python scripts/benchmark.py --preset cpu --data ../shared/data/cifar10-jpeg
    python scripts/benchmark.py --preset gpu --data DIR
    python scripts/benchmark.py --model preact:1001 --variant bf16 --variant bf16,graphs=off

A variant is a comma list of levers: fp32|bf16|fp16, cl=on|off (channels_last),
graphs=auto|on|off (CUDA graphs), compile=on|off|MODE, ckpt=N (activation
checkpoint segments). Results go to --out (benchmark.md, benchmark.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EPOCH_IMAGES = 50_000

PRESETS: dict[str, dict[str, Any]] = {
    # What the README's Performance section reports for each kind of machine.
    "cpu": {
        "models": ["original:20", "original:110", "preact:164"],
        # bf16 on a CPU without native bf16 runs ~10x slower than fp32 (see README):
        # measure it with --model original:20 --variant bf16, not at every depth.
        "variants": ["default", "fp32,cl=off"],
        "steps": 5,
        "warmup": 3,
    },
    "gpu": {
        "models": ["original:20", "original:56", "original:110", "preact:1001"],
        "variants": ["default", "graphs=off", "fp32,cl=off,graphs=off"],
        "steps": 20,
        "warmup": 10,
    },
}


def parse_variant(text: str) -> dict[str, str]:
    levers = {"precision": "auto", "cl": "on", "graphs": "auto", "compile": "off", "ckpt": "0"}
    for part in filter(None, text.split(",")):
        if part == "default":
            continue
        if part in ("fp32", "bf16", "fp16", "auto"):
            levers["precision"] = part
            continue
        key, _, value = part.partition("=")
        if key not in levers or not value:
            raise SystemExit(f"benchmark: unknown lever {part!r} in variant {text!r}")
        levers[key] = value
    return levers


# --- workers (run in a subprocess each) ----------------------------------------


def peak_memory_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(step, device: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``step`` (warm-up excluded) and read the peak memory it reached."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return {
        "windows_s": time_windows(step, sync, args.warmup, args.steps, args.repeats),
        "peak_memory_mb": peak_memory_mb(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
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


def data_config(args: argparse.Namespace):
    from resnet_exp.config import DataConfig

    if args.data == "synthetic":
        return DataConfig(
            name="synthetic", synthetic_train=args.synthetic_images, synthetic_test=10
        )
    return DataConfig(name="cifar10", root=args.data, download=False, test_limit=10)


def project_worker(args: argparse.Namespace) -> dict[str, Any]:
    """resnet-exp's own path: device-resident data, the trainer's step function."""
    import torch

    from resnet_exp.config import OptimizerConfig, ScheduleConfig
    from resnet_exp.data import Normalize, TrainLoader, load_dataset
    from resnet_exp.models import build_model
    from resnet_exp.train.optim import build_optimizer, build_scheduler
    from resnet_exp.train.runtime import pick_device, pick_precision, seed_everything
    from resnet_exp.train.step import make_train_step

    lv = parse_variant(args.variant)
    device = pick_device(args.device)
    precision = pick_precision(lv["precision"], device)
    seed_everything(0, deterministic=False)
    data = load_dataset(data_config(args))
    block, depth = args.model.split(":")
    cl = lv["cl"] == "on"
    model = build_model(block, int(depth), data.num_classes, checkpoint_segments=int(lv["ckpt"]))
    model = model.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format)
    loader = TrainLoader(
        data.train, args.batch, Normalize(data.mean, data.std, device), device, 0, channels_last=cl
    )
    optimizer = build_optimizer(model, OptimizerConfig(), fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, ScheduleConfig(), 64_000, warmup=False)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    compile_on = lv["compile"] != "off"
    mode = lv["compile"] if lv["compile"] not in ("on", "off") else "default"
    graphs = {"on": "true", "off": "false"}.get(lv["graphs"], lv["graphs"])
    train_step = make_train_step(
        model, optimizer, scaler, device, precision, compile_on, mode, graphs
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    acc = torch.zeros((), device=device)

    def step() -> None:
        nonlocal acc
        x, y = loader.next()
        loss, _ = train_step(x, y)
        scheduler.step()
        acc += loss.float()  # as the trainer does: metrics stay on the device

    return {
        "kind": "resnet-exp",
        "precision": precision,
        "channels_last": cl,
        "cuda_graphs": type(train_step).__name__ == "CudaGraphStep",
        "compile": lv["compile"],
        "checkpointing": int(lv["ckpt"]),
        **measure(step, device, args),
    }


def reference_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The textbook loop: per-image PIL transforms in DataLoader workers, fp32."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchvision
    import torchvision.transforms as T
    from PIL import Image

    from resnet_exp.data import load_dataset
    from resnet_exp.models import build_model
    from resnet_exp.train.runtime import pick_device

    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    stats = load_dataset(data_config(args))  # per-channel mean/std, as the project uses
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(stats.mean, stats.std),
        ]
    )
    root = Path(args.data)
    if args.data == "synthetic":
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
        batch_size=args.batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    block, depth = args.model.split(":")
    model = build_model(block, int(depth), stats.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
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
        "precision": "fp32",
        "channels_last": False,
        "cuda_graphs": False,
        "compile": "off",
        "checkpointing": 0,
        "workers": workers,
        **measure(step, device, args),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


# --- driver ----------------------------------------------------------------------


def run_worker(args: argparse.Namespace, model: str, variant: str | None) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "reference" if variant is None else "project",
        "--model",
        model,
        "--variant",
        variant or "",
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--data",
        args.data,
        "--workers",
        str(args.workers),
        "--synthetic-images",
        str(args.synthetic_images),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"model": model, "variant": variant or "reference", "error": tail[0]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    step_s = statistics.median(result["windows_s"]) / args.steps
    result.update(
        model=model,
        variant=variant or "reference",
        batch=args.batch,
        images_per_s=args.batch / step_s,
        ms_per_step=1000 * step_s,
        epoch_s=EPOCH_IMAGES / (args.batch / step_s),
    )
    return result


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | variant | precision | channels_last | CUDA graphs | compile | ckpt | images/s "
        "| ms/step | s/epoch (50k) | peak memory (MB) | vs reference |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} |" + " |" * 9)
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "—"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['precision']} | {'on' if r['channels_last'] else 'off'} "
            f"| {'on' if r['cuda_graphs'] else 'off'} | {r['compile']} | {r['checkpointing'] or '—'} "
            f"| {r['images_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['epoch_s']:.1f} "
            f"| {r['peak_memory_mb']:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--model", action="append", help="block:depth, e.g. preact:1001 (repeatable)")
    p.add_argument(
        "--variant", action="append", help="levers, e.g. bf16,cl=on,graphs=off (repeatable)"
    )
    p.add_argument(
        "--data",
        default=os.environ.get("RESNET_EXP_DATA", "synthetic"),
        help="CIFAR-10 root (train/+test/ folders or cifar-10-batches-py), or 'synthetic'",
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--workers", type=int, default=4, help="DataLoader workers of the reference loop"
    )
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--synthetic-images", type=int, default=10_000)
    p.add_argument("--out", default=f"outputs/bench/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    p.add_argument("--worker", choices=["project", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()

    preset = PRESETS.get(args.preset or "", {})
    args.steps = args.steps or preset.get("steps", 10)
    args.warmup = args.warmup if args.warmup is not None else preset.get("warmup", 5)
    if args.worker:
        args.model, args.variant = args.model[0], (args.variant or [""])[0]
        worker = project_worker if args.worker == "project" else reference_worker
        print(json.dumps(worker(args)))
        return

    models = args.model or preset.get("models") or ["original:20"]
    variants = args.variant or preset.get("variants") or ["default"]
    for v in variants:
        parse_variant(v)  # fail on a typo before measuring anything
    rows: list[dict[str, Any]] = []
    for model in models:
        ref = None if args.no_reference else run_worker(args, model, None)
        group = [ref] if ref else []
        for variant in variants:
            group.append(run_worker(args, model, variant))
        for r in group:
            if ref and "error" not in ref and "error" not in r and r is not ref:
                r["ratio"] = r["images_per_s"] / ref["images_per_s"]
            print(markdown([r]).splitlines()[-1], flush=True)
        rows += group
    device = next((r["device_name"] for r in rows if "device_name" in r), "?")
    table = markdown(rows)
    text = (
        f"Device: {device}; batch {args.batch}; data {args.data}; median of {args.repeats} windows "
        f"of {args.steps} steps after {args.warmup} warm-up steps.\n\n{table}\n"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(text)
    (out / "benchmark.json").write_text(
        json.dumps(
            {"device": device, "batch": args.batch, "data": args.data, "rows": rows}, indent=2
        )
    )
    print()
    print(text)
    print(f"written: {out / 'benchmark.md'}, {out / 'benchmark.json'}")


if __name__ == "__main__":
    main()
