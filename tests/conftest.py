"""Shared fixtures: the real CIFAR-10 copy when present, else synthetic data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = Path(
    os.environ.get("RESNET_EXP_CIFAR10", REPO.parent / "shared" / "data" / "cifar10-jpeg")
)


# A tiny synthetic job: depth 8 on 16x16 images, 16 steps an epoch, a second a run.
TINY = [
    "dataset=synthetic",
    "data.synthetic_train=256",
    "data.synthetic_test=64",
    "data.image_size=16",
    "depth=8",
    "data.batch_size=16",
    "trainer.progress=false",
    "trainer.device=cpu",
]
# Subprocesses on one thread: fast on a busy 2-core machine, bit-exact across processes.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def cifar10_root() -> Path | None:
    return CIFAR10 if (CIFAR10 / "train").is_dir() and (CIFAR10 / "test").is_dir() else None


def console_script() -> str:
    """The installed `resnet-exp`, next to this interpreter."""
    path = Path(sys.executable).parent / "resnet-exp"
    return str(path) if path.exists() else shutil.which("resnet-exp") or "resnet-exp"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode cache for the whole session (decoding 60k JPEGs once, not per run)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def data_args(cache_dir: Path) -> list[str]:
    """Overrides for a small but real data set: CIFAR-10 subsets when the copy exists."""
    root = cifar10_root()
    common = [f"data.cache_dir={cache_dir}"]
    if root is None:
        return [
            "dataset=synthetic",
            "data.synthetic_train=1024",
            "data.synthetic_test=256",
            *common,
        ]
    return [
        "dataset=cifar10",
        f"data.root={root}",
        "data.train_limit=1024",
        "data.test_limit=256",
        *common,
    ]


def run_cli(
    args: list[str], cwd: Path, check: bool = True, timeout: int = 600, env: dict | None = None
):
    """Run the console script from ``cwd``; returns the CompletedProcess."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = subprocess.run(
        [console_script(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"resnet-exp {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def cli():
    return run_cli
