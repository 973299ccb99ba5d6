"""What the fidelity options (docs/fidelity.md) cost per training step, on this machine.

    python scripts/fidelity_cost.py                       # ResNet-20, batch 128, CPU
    python scripts/fidelity_cost.py --depth 110 --device cuda
    python scripts/fidelity_cost.py --parts bf16 --batch 32   # CPUs without fast bf16

Times a full step (forward, loss, backward, SGD update; channels_last) of a
pre-activation net with and without each option, alternating the variants
over several rounds and reporting the median, and the loader's batch
(crop, flip, normalise) with mean and zero padding.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from resnet_exp import build_model
from resnet_exp.data import Normalize, TrainLoader
from resnet_exp.data.sources import Split


def step_timer(device: torch.device, depth: int, batch: int, precision: str, **options):
    torch.manual_seed(0)
    model = build_model("preact", depth, **options).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )

    def step() -> None:
        with amp:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def loader_timer(device: torch.device, batch: int, pad_value: str):
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.zeros(4096, dtype=torch.int64))
    norm = Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26), device)
    loader = TrainLoader(split, batch, norm, device, 0, pad_value=pad_value)
    return loader.next


def median_seconds(fns: dict[str, object], device: torch.device, steps: int, rounds: int):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        for _ in range(2):
            fn()
    for _ in range(rounds):  # alternate, so a busy machine slows every variant alike
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--parts",
        default="bn,bf16,pad",
        help="comma list: bn (ghost batch norm), bf16 (fp32_identity under autocast), pad",
    )
    a = p.parse_args()
    dev = torch.device(a.device)
    d, b = a.depth, a.batch
    parts = set(a.parts.split(","))
    groups = {}
    if "bn" in parts:
        groups |= {
            "fp32, whole-batch BN": step_timer(dev, d, b, "fp32"),
            f"fp32, model.bn_group={b // 2}": step_timer(dev, d, b, "fp32", bn_group=b // 2),
        }
    if "bf16" in parts:
        groups |= {
            "bf16, fp32_identity=true": step_timer(dev, d, b, "bf16"),
            "bf16, fp32_identity=false": step_timer(dev, d, b, "bf16", fp32_identity=False),
        }
    if "pad" in parts:
        groups |= {
            "loader, pad_value=mean": loader_timer(dev, b, "mean"),
            "loader, pad_value=zero": loader_timer(dev, b, "zero"),
        }
    res = median_seconds(groups, dev, a.steps, a.rounds)
    print(f"preact ResNet-{d}, batch {b}, {dev}, torch {torch.__version__}")
    print("| variant | ms / step | images/s |\n|---|---|---|")
    for k, s in res.items():
        print(f"| {k} | {1e3 * s:.1f} | {b / s:,.0f} |")


if __name__ == "__main__":
    main()
