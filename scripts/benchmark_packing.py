#!/usr/bin/env python
"""Packing: aggregate training images/s of N runs trained at once in one process.

Each configuration runs in a fresh subprocess (peak memory is its own): N runs
are built one after another (their own model, data, optimizer, seed), then
trained on N threads as the packed launcher trains them (resnet_exp/pack.py:
on a GPU each thread on its own CUDA stream with its own CUDA graph; on the
CPU each with ``threads`` intra-op threads), the first step of each under the
set-up gate. After warm-up, ``--repeats`` windows of ``--steps`` steps per
run are timed between barriers; the aggregate is all runs' images over the
window, the median window is reported, against one run alone (``1xT``, T =
all cores) measured in the same benchmark run. ``--rounds`` repeats the whole
set, for machines whose load changes (ratios are taken within a round).

    python scripts/benchmark_packing.py --preset cpu
    python scripts/benchmark_packing.py --preset gpu --data /path/to/cifar10
    python scripts/benchmark_packing.py --model original:20 --pack 1x2 --pack 2x1 --pack 2x2

A pack is ``N`` (threads per run: cores / N, at least 1) or ``NxT``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchtools import compose, device_name, markdown, peak_memory_mb, run_worker, write_results  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # Short on a CPU: ResNet-20, alone on all cores against 2, 4 and 8 packed runs.
    "cpu": {"models": {"original:20": ["1", "2", "4", "8"]}, "steps": 6, "warmup": 2},
    "gpu": {
        "models": {
            "original:110": ["1", "2", "4"],
            "original:20": ["1", "2", "4", "8"],
            "preact:164": ["1", "2", "4"],
        },
        "steps": 30,
        "warmup": 10,
    },
    # scripts/gpu_check.py: ResNet-20 x 1, 4, 8 and ResNet-110 x 1, 2, 4
    "gpu-check": {
        "models": {"original:20": ["1", "4", "8"], "original:110": ["1", "2", "4"]},
        "steps": 20,
        "warmup": 5,
    },
    # gpu_check.py --dry: ResNet-8 alone and two at once on the CPU
    "dry": {"models": {"original:8": ["1x1", "2x1"]}, "steps": 2, "warmup": 1},
}


def parse_pack(text: str, cores: int) -> tuple[int, int]:
    runs, _, threads = text.partition("x")
    try:
        n = int(runs)
        t = int(threads) if threads else max(1, cores // n)
    except ValueError:
        raise SystemExit(f"benchmark_packing: a pack is N or NxT, not {text!r}") from None
    if n < 1 or t < 1:
        raise SystemExit(f"benchmark_packing: a pack needs N, T >= 1, not {text!r}")
    return n, t


# --- worker (a subprocess per configuration) -------------------------------------


def run_overrides(args: argparse.Namespace, seed: int, device: Any) -> list[str]:
    """One run of the pack, as Hydra overrides: ``--model``, ``--data``, ``--batch``, its seed."""
    block, depth = args.model.split(":")
    if args.data == "synthetic":
        data = ["dataset=synthetic", f"data.synthetic_train={args.synthetic_images}"]
        data += ["data.synthetic_test=10"]
    else:
        data = ["dataset=cifar10", f"data.root={args.data}", "data.download=false"]
    return [
        f"block={block}",
        f"depth={depth}",
        *data,
        "data.test_limit=10",
        f"data.batch_size={args.batch}",
        f"seed={seed}",
        f"trainer.device={device}",
        "trainer.progress=false",
    ]


def build_run(args: argparse.Namespace, seed: int, device: Any):
    """One run as the trainer builds it (``build_setup``): its model, data, optimizer, step."""
    import torch

    from resnet_exp.train.context import resolve
    from resnet_exp.train.setup import build_setup
    from resnet_exp.train.step import CudaGraphStep

    cfg = compose(run_overrides(args, seed, device))
    s = build_setup(cfg, resolve(cfg, Path("unused")))  # no run folder: nothing is written
    acc = torch.zeros((), device=s.device)

    def step() -> None:
        nonlocal acc
        x, y = s.loader.next()
        loss, _ = s.train_step(x, y)
        s.scheduler.step()
        acc += loss.float()  # as the trainer does: metrics stay on the device

    return step, s.precision.value, isinstance(s.train_step, CudaGraphStep)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from resnet_exp.sweep import pack

    runs, threads = parse_pack(args.pack[0], pack.cpu_cores())
    device = pack.pack_device(args.device)
    torch.set_num_threads(threads)
    built = [build_run(args, seed, device) for seed in range(runs)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    gate = pack.SetupGate()
    barrier = threading.Barrier(runs + 1)
    errors: list[BaseException] = []

    def train(step) -> None:
        try:
            with pack.run_on(device, threads):
                with gate.held():  # the first step (a CUDA graph's capture) one run at a time
                    step()
                for _ in range(args.warmup):
                    step()
                for _ in range(args.repeats):
                    _sync(device)
                    barrier.wait()
                    for _ in range(args.steps):
                        step()
                    _sync(device)
                    barrier.wait()
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    workers = [threading.Thread(target=train, args=(b[0],), daemon=True) for b in built]
    for w in workers:
        w.start()
    windows = []
    try:
        for _ in range(args.repeats):
            barrier.wait()
            t = time.perf_counter()
            barrier.wait()
            windows.append(time.perf_counter() - t)
    except threading.BrokenBarrierError:
        raise errors[0] from None
    for w in workers:
        w.join()
    return {
        "runs": runs,
        "threads": threads,
        "precision": built[0][1],
        "cuda_graphs": built[0][2],
        "windows_s": windows,
        "peak_memory_mb": peak_memory_mb(device),
        "device_name": device_name(device),
    }


def alternate_worker(args: argparse.Namespace) -> dict[str, Any]:
    """All packs in one process, their windows alternating: on a machine whose load
    changes, neighbouring windows see about the same load, so their ratio holds."""

    from resnet_exp.sweep import pack

    specs = [parse_pack(s, pack.cpu_cores()) for s in args.pack]
    device = pack.pack_device(args.device)
    built = [build_run(args, seed, device) for seed in range(max(n for n, _ in specs))]
    for step, *_ in built:  # first steps (CUDA graph captures) and warm-up, one run at a time
        for _ in range(1 + args.warmup):
            step()
    windows: dict[str, list[float]] = {f"{n}x{t}": [] for n, t in specs}
    for _ in range(args.repeats):
        for n, t in specs:
            windows[f"{n}x{t}"].append(_window([b[0] for b in built[:n]], device, t, args.steps))
    return {
        "windows_s": windows,
        "precision": built[0][1],
        "cuda_graphs": built[0][2],
        "peak_memory_mb": peak_memory_mb(device),
        "device_name": device_name(device),
    }


def _window(steps: list[Any], device: Any, threads: int, n_steps: int) -> float:
    """Seconds for every run to take ``n_steps`` steps, each on its own thread."""
    from resnet_exp.sweep import pack

    barrier = threading.Barrier(len(steps) + 1)
    errors: list[BaseException] = []

    def train(step) -> None:
        try:
            with pack.run_on(device, threads):
                barrier.wait()
                for _ in range(n_steps):
                    step()
                _sync(device)
                barrier.wait()
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    workers = [threading.Thread(target=train, args=(s,), daemon=True) for s in steps]
    for w in workers:
        w.start()
    try:
        barrier.wait()
        t = time.perf_counter()
        barrier.wait()
    except threading.BrokenBarrierError:
        raise errors[0] from None
    for w in workers:
        w.join()
    return time.perf_counter() - t


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


# --- driver ----------------------------------------------------------------------


def worker_args(args: argparse.Namespace, model: str, specs: list[str]) -> list[str]:
    out = ["--model", model]
    for spec in specs:
        out += ["--pack", spec]
    for key in ("batch", "steps", "warmup", "repeats", "device", "data", "synthetic_images"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def measure_pack(args: argparse.Namespace, model: str, spec: str) -> dict[str, Any]:
    r = run_worker(__file__, worker_args(args, model, [spec]))
    r.update(model=model, pack=spec)
    if "error" not in r:
        window = statistics.median(r["windows_s"])
        r["images_per_s"] = r["runs"] * args.steps * args.batch / window
    return r


def measure_alternating(
    args: argparse.Namespace, model: str, specs: list[str]
) -> list[dict[str, Any]]:
    r = run_worker(__file__, ["--alternate", *worker_args(args, model, specs)])
    if "error" in r:
        return [{"model": model, "pack": " ".join(specs), "error": r["error"]}]
    rows = []
    for spec, windows in r["windows_s"].items():
        n, t = (int(v) for v in spec.split("x"))
        ips = [n * args.steps * args.batch / w for w in windows]
        rows.append(
            {
                **{k: r[k] for k in ("precision", "cuda_graphs", "device_name")},
                "model": model,
                "pack": spec,
                "runs": n,
                "threads": t,
                "images_per_s": statistics.median(ips),
                "per_window": ips,
                "peak_memory_mb": r["peak_memory_mb"],  # the whole process: every pack's runs
            }
        )
    alone = [row for row in rows if row["runs"] == 1]
    for row in rows:  # the ratio within each repeat (neighbouring windows), then its median
        if alone:
            row["ratios"] = [a / b for a, b in zip(row["per_window"], alone[0]["per_window"])]
            row["ratio"] = statistics.median(row["ratios"])
    return rows


COLUMNS = [
    "model", "round", "runs x threads", "aggregate images/s", "per run", "vs alone",
    "peak memory (MB)",
]  # fmt: skip


def cells(r: dict[str, Any]) -> list[str]:
    return [
        r["model"],
        str(r["round"]),
        f"{r['runs']}x{r['threads']}",
        f"{r['images_per_s']:,.0f}",
        f"{r['images_per_s'] / r['runs']:,.0f}",
        f"{r['ratio']:.2f}x" if "ratio" in r else "—",
        f"{r['peak_memory_mb']:,.0f}",
    ]


def table(rows: list[dict[str, Any]]) -> str:
    return markdown(COLUMNS, rows, cells, keys=["model", "round", "pack"])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--model", action="append", help="block:depth (repeatable)")
    p.add_argument("--pack", action="append", help="N or NxT: N runs, T threads each (repeatable)")
    p.add_argument("--data", default="synthetic", help="CIFAR-10 root, or 'synthetic'")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, help="timed steps per run and window")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole set (noisy machines)")
    p.add_argument("--device", default="auto")
    p.add_argument("--synthetic-images", type=int, default=10_000)
    p.add_argument("--out", default=f"outputs/bench/packing-{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    p.add_argument(
        "--alternate",
        action="store_true",
        help="all packs of a model in one process, windows alternating (ratios on a busy machine)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    preset = PRESETS.get(args.preset or "", {})
    args.steps = args.steps or preset.get("steps", 10)
    args.warmup = args.warmup if args.warmup is not None else preset.get("warmup", 3)
    if args.worker:
        args.model = args.model[0]
        print(json.dumps(alternate_worker(args) if args.alternate else worker(args)))
        return

    if args.model:
        plan = {m: args.pack or ["1", "2", "4", "8"] for m in args.model}
    else:
        plan = preset.get("models") or {"original:20": args.pack or ["1", "2"]}
    from resnet_exp.sweep.pack import cpu_cores

    for specs in plan.values():
        for spec in specs:
            parse_pack(spec, cpu_cores())  # a typo fails before measuring anything
    rows: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        for model, specs in plan.items():
            if args.alternate:
                group = measure_alternating(args, model, specs)
            else:
                group = [measure_pack(args, model, spec) for spec in specs]
                alone = next((r for r in group if r.get("runs") == 1 and "error" not in r), None)
                for r in group:
                    if alone and "error" not in r:
                        r["ratio"] = r["images_per_s"] / alone["images_per_s"]
            for r in group:
                r["round"] = round_
                print(table([r]).splitlines()[-1], flush=True)
            rows += group
    device = next((r["device_name"] for r in rows if "device_name" in r), "?")
    text = (
        f"Device: {device}; batch {args.batch}; data {args.data}; median of {args.repeats} windows "
        f"of {args.steps} steps per run after {args.warmup} warm-up steps; 'vs alone': against the "
        f"1-run row of the same model and round"
        + (
            " (--alternate: all packs in one process, windows alternating; the ratio is the "
            "median of the ratios of neighbouring windows; peak memory is the whole process's)"
            if args.alternate
            else ""
        )
        + f".\n\n{table(rows)}\n"
    )
    write_results(Path(args.out), "packing", text, {"device": device, "rows": rows})


if __name__ == "__main__":
    main()
