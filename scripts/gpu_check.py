#!/usr/bin/env python
"""Does the GPU path work on this machine, and how fast is it? One command, one folder.

On one GPU: the CUDA-only tests (CUDA-graph step, packed runs on CUDA streams,
device JPEG decode), then the single-run table (ResNet-20, ResNet-110, pre-act
ResNet-164 and ResNet-1001 at batch 64: images/s, seconds per 50k-image epoch,
peak memory, against the textbook PyTorch loop measured in the same call:
``scripts/benchmark.py --preset gpu-check``) and the packing table (ResNet-20 x 1,
4, 8 and ResNet-110 x 1, 2, 4: aggregate images/s against one run alone:
``scripts/benchmark_packing.py --preset gpu-check``). The folder holds:

    env.json                 GPU name, driver, CUDA, cuDNN, torch, torchvision, Python
    tests.xml, tests.txt     the tests' JUnit record and pytest's own report
    single/benchmark.{md,json}
    packing/packing.{md,json}
    summary.{md,json}        the above in one page (also printed at the end)

    python scripts/gpu_check.py                    # outputs/gpu-check/<time>/
    python scripts/gpu_check.py --data DIR         # CIFAR-10 images instead of synthetic ones
    python scripts/gpu_check.py --dry              # the same on the CPU with tiny nets (~1 min)
    python scripts/gpu_check.py --out DIR          # into DIR (make gpu-check OUT=DIR)

Without a GPU (and without --dry), or with --data naming a folder that holds no
CIFAR-10, it says so in one line and exits with 2, writing nothing. Each step (the
tests, each table) runs in its own process group and is killed at --timeout
(default 600 s; one measurement of a table at half of it) and reported as timed
out; the summary is written whatever happened. Exit status: 0, or 1 when a test
failed or a step did not finish. The targets printed in the summary are the
project's aims, not checks: nothing here fails on a slow figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
from benchtools import cpu_name, run_killable  # noqa: E402  (scripts/ is first on sys.path)

# The tests that skip without CUDA.
CUDA_TESTS = [
    "tests/test_cuda_graphs.py",
    "tests/test_packing.py::test_threads_train_each_run_as_alone[cuda]",
    "tests/test_imagenet.py::test_gpu_decode_path_matches_the_cpu_path",
]
# What the GPU path aims at (docs/resume.md#short-gpu-windows); reported, never asserted.
TARGETS = {
    "ResNet-20 x 8 packed, vs alone": ("original:20", 8, 4.0),
    "ResNet-110 x 4 packed, vs alone": ("original:110", 4, 3.0),
}
EPOCH_TARGET = ("block=original depth=110", 2.5)  # s per 50k-image epoch, one run


def environment(dry: bool) -> dict[str, Any]:
    import torch
    import torchvision

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "dry": dry,
    }
    if torch.cuda.is_available() and not dry:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
        env["driver"] = _nvidia_smi("driver_version")
    else:
        env["device"] = cpu_name()
    return env


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def run_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    """The CUDA-only tests (they skip on a CPU: the dry mode runs their plumbing)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += ["--junitxml", str(out / "tests.xml"), *CUDA_TESTS]
    done = run_killable(cmd, timeout_s, cwd=REPO)
    (out / "tests.txt").write_text(done.stdout + done.stderr)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    result: dict[str, Any] = {"exit": done.returncode, "command": " ".join(cmd[1:])}
    if done.timed_out:  # the JUnit file is written at the end: none, or a stale one
        return {**counts, "errors": 1, **result, "error": done.error("the tests")}
    try:
        suite = ET.parse(out / "tests.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        total = int(suite.get("tests", 0))
        for key in ("failures", "errors", "skipped"):
            counts["failed" if key == "failures" else key] = int(suite.get(key, 0))
        counts["passed"] = total - counts["failed"] - counts["errors"] - counts["skipped"]
    except (OSError, ET.ParseError, IndexError):
        counts["errors"] = 1
        result["error"] = done.error("the tests") or "the tests wrote no readable tests.xml"
    return {**counts, **result}


def run_table(
    script: str, args: list[str], out: Path, stem: str, timeout_s: float
) -> dict[str, Any]:
    """A benchmark script (each of its measurements in its own subprocess) into ``out``."""
    cmd = [sys.executable, str(HERE / script), *args, "--out", str(out)]
    done = run_killable(cmd, timeout_s, cwd=REPO)
    (out.parent / f"{stem}.log").write_text(done.stdout + done.stderr)
    path = out / f"{stem}.json"
    error = done.error(script)
    if error is None and not path.exists():
        error = f"{script} wrote no {path.name}"
    if error is not None:
        return {"error": error, "rows": []}
    return json.loads(path.read_text())


def summary(env: dict[str, Any], tests: dict[str, Any], single: dict, packing: dict) -> str:
    device = env.get("gpu") or env.get("device")
    lines = [
        f"# gpu-check{' --dry (CPU, tiny nets)' if env['dry'] else ''}: {device}",
        "",
        f"torch {env['torch']}, torchvision {env['torchvision']}, CUDA {env['cuda']}, "
        f"cuDNN {env['cudnn']}, driver {env.get('driver') or '—'}, Python {env['python']}",
        "",
        f"CUDA-only tests: {tests['passed']} passed, {tests['failed']} failed, "
        f"{tests['errors']} errors, {tests['skipped']} skipped (tests.txt)"
        + (f"; {tests['error']}" if tests.get("error") else ""),
        "",
        f"## One run at batch {16 if env['dry'] else 64} (single/benchmark.md)",
        "",
        "| model | images/s | s / 50k-image epoch | peak memory (MB) | vs reference |",
        "|---|---|---|---|---|",
    ]
    for r in single.get("rows", []):
        if r.get("variant") == "reference":
            continue
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "—"
        lines.append(
            f"| {r['model']} | {r['images_per_s']:,.0f} | {r['epoch_s']:.1f} "
            f"| {r['peak_memory_mb']:,.0f} | {ratio} |"
        )
    lines += [
        "",
        "## Packed runs (packing/packing.md)",
        "",
        "| model | runs | aggregate images/s | vs one alone |",
        "|---|---|---|---|",
    ]
    for r in packing.get("rows", []):
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('pack')} | failed: {r['error']} | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "—"
        lines.append(f"| {r['model']} | {r['runs']} | {r['images_per_s']:,.0f} | {ratio} |")
    for what in (single, packing):
        if "error" in what:
            lines += ["", f"failed: {what['error']}"]
    if not env["dry"]:
        lines += ["", "## Targets (aims, not checks)", ""] + targets(single, packing)
    return "\n".join(lines) + "\n"


def targets(single: dict, packing: dict) -> list[str]:
    out = []
    for name, (model, runs, aim) in TARGETS.items():
        row = next(
            (
                r
                for r in packing.get("rows", [])
                if r.get("model") == model and r.get("runs") == runs
            ),
            None,
        )
        got = f"{row['ratio']:.2f}x" if row and "ratio" in row else "not measured"
        out.append(f"- {name}: {got} (aim: at least {aim:.0f}x)")
    model, aim = EPOCH_TARGET
    row = next(
        (
            r
            for r in single.get("rows", [])
            if r.get("model") == model and "epoch_s" in r and r.get("variant") != "reference"
        ),
        None,
    )
    got = f"{row['epoch_s']:.1f} s" if row else "not measured"
    out.append(f"- ResNet-110, one run, s per 50k-image epoch: {got} (aim: at most {aim} s)")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dry", action="store_true", help="on the CPU with tiny nets (~1 minute)")
    p.add_argument("--data", default=None, help="CIFAR-10 root (default: synthetic images)")
    p.add_argument("--out", type=Path, default=None, help="default outputs/gpu-check/<time>")
    p.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds each step (the tests, each table) may take before it is killed "
        "and reported as timed out; one measurement of a table: half of it (default 600)",
    )
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error(f"--timeout {args.timeout:g} must be positive")
    return args


def refusal(args: argparse.Namespace) -> str | None:
    """Why nothing can run here (no GPU, the data not there), before anything is written."""
    import torch

    if not args.dry and not torch.cuda.is_available():
        return (
            "needs a CUDA GPU (torch.cuda.is_available() is false here); "
            "--dry runs the same checks on the CPU with tiny nets"
        )
    if args.data:
        from resnet_exp.data.stage import require
        from resnet_exp.errors import UserError

        try:
            require("cifar10", Path(args.data), download=False)
        except UserError as e:
            return str(e)
    return None


def run_steps(args: argparse.Namespace, out: Path, results: dict[str, Any]) -> None:
    """The tests, then the two tables, each into ``results`` as it ends."""
    results["tests"] = tests = run_tests(out, args.timeout)
    print(
        f"gpu-check: tests: {tests['passed']} passed, {tests['failed']} failed, "
        f"{tests['skipped']} skipped" + (f"; {tests['error']}" if tests.get("error") else ""),
        flush=True,
    )
    preset = "dry" if args.dry else "gpu-check"
    bench = ["--preset", preset]  # then the overrides, in one run (argparse's positionals)
    if args.dry:
        bench += ["data.image_size=16", "data.batch_size=16", "trainer.device=cpu"]
    else:
        bench += ["data.batch_size=64"]
    if args.data:
        bench += ["dataset=cifar10", f"data.root={args.data}", "data.download=false"]
    if args.dry:
        bench += ["--repeats", "1", "--workers", "0"]
    results["single"] = run_table("benchmark.py", bench, out / "single", "benchmark", args.timeout)
    print("gpu-check: single-run table " + results["single"].get("error", "done"), flush=True)
    pack = ["--preset", preset, "--data", args.data or "synthetic"]
    if args.dry:
        pack += ["--batch", "16", "--repeats", "1", "--device", "cpu", "--synthetic-images", "512"]
    results["packing"] = run_table(
        "benchmark_packing.py", pack, out / "packing", "packing", args.timeout
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    problem = refusal(args)
    if problem is not None:
        print(f"gpu-check: error: {problem}", file=sys.stderr)
        return 2
    kind = "gpu-check-dry" if args.dry else "gpu-check"
    out = args.out or REPO / "outputs" / kind / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.dry)
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(f"gpu-check: {env.get('gpu') or env.get('device')}; results in {out}", flush=True)
    # A measurement alone gets half a step's time: a hung one is reported in its row.
    os.environ["RESNET_EXP_WORKER_TIMEOUT"] = str(args.timeout / 2)
    not_run = {"error": "not run", "rows": []}
    results: dict[str, Any] = {
        "tests": {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "error": "not run"},
        "single": dict(not_run),
        "packing": dict(not_run),
    }
    try:
        run_steps(args, out, results)
    finally:  # written whatever happened above (a step killed, an interrupt)
        text = summary(env, results["tests"], results["single"], results["packing"])
        took = time.monotonic() - t0
        payload = {"env": env, "took_s": round(took, 1), **results}
        (out / "summary.md").write_text(text)
        (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(text)
    print(f"gpu-check: {took:.0f} s; everything in {out}")
    tests = results["tests"]
    bad = (
        tests["failed"]
        or tests["errors"]
        or any("error" in results[k] for k in ("single", "packing"))
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
