"""Shared test helpers: the tiny job, composing configs, running the command (in this
process or as the console script), reading TensorBoard scalars, one CPU thread."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from resnet_exp.models.units import Block

REPO = Path(__file__).resolve().parents[1]
# The real CIFAR-10 images: $RESNET_EXP_CIFAR10, else ../shared/data/cifar10-jpeg beside
# the checkout (or beside its parent: a worktree in a subdirectory).
_SHARED = [p / "shared" / "data" / "cifar10-jpeg" for p in (REPO.parent, REPO.parent.parent)]
CIFAR10 = Path(
    os.environ.get("RESNET_EXP_CIFAR10", next((p for p in _SHARED if p.is_dir()), _SHARED[0]))
)
# The five units of the paper's Fig. 4, in its order (a)-(e).
BLOCKS = [b.value for b in Block]

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


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """This process on one thread too: the suite shares two cores with other jobs, and two
    OpenMP threads then wait on each other (a ResNet-20 step measured 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cifar10_root() -> Path | None:
    return CIFAR10 if (CIFAR10 / "train").is_dir() and (CIFAR10 / "test").is_dir() else None


def make_cifar_folders(root: Path, train: int = 16, test: int = 4, classes: int = 10) -> Path:
    """A tiny CIFAR-10 copy in the class-folder layout runs read (train/<class>/ and
    test/<class>/, 32x32 PNGs, ``train`` and ``test`` images per class): a data set
    that is "there" without downloading 170 MB."""
    from PIL import Image

    gen = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = gen.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def import_script(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A script of scripts/ as a module (its neighbours importable, as when it runs)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(f"script_{name[:-3]}", REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, spec.name, module)  # where dataclasses look types up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def console_script() -> str:
    """The installed `resnet-exp`, next to this interpreter."""
    path = Path(sys.executable).parent / "resnet-exp"
    return str(path) if path.exists() else shutil.which("resnet-exp") or "resnet-exp"


def signal_after_first_evaluation(
    args: list[str], cwd: Path, metrics: list[Path], signum: int
) -> tuple[int, str]:
    """Start the console script (one thread), wait until every ``metrics`` file holds a
    complete line (a file, not a time: the run is in its loop, its handlers installed),
    send ``signum``; the exit status and what it wrote to stderr."""
    err = cwd / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [console_script(), *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **ONE_THREAD},
        )
        try:
            deadline = time.monotonic() + 300
            while not all(m.exists() and m.read_text().endswith("\n") for m in metrics):
                assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
                time.sleep(0.01)
            proc.send_signal(signum)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, err.read_text()


def compose_config(overrides: list[str]):
    """The Config the command would build from these overrides (no run directory)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from resnet_exp.cli import config_dir

    if GlobalHydra.instance().is_initialized():  # inside a module's own initialize
        return OmegaConf.to_object(compose("config", overrides=overrides))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def tb_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar of a run: tag -> {step: value} (a resume rewrites steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode cache for the whole session (decoding 60k JPEGs once, not per run)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def data_args(cache_dir: Path) -> list[str]:
    """Overrides for a small data set (synthetic: decoding the real CIFAR-10 copy takes
    a minute; the slow tests train on it)."""
    return [
        "dataset=synthetic",
        "data.synthetic_train=1024",
        "data.synthetic_test=256",
        f"data.cache_dir={cache_dir}",
    ]


@dataclass
class Result:
    """What a command run left: as subprocess.CompletedProcess names it."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(
    args: list[str], cwd: Path, check: bool = True, timeout: int = 600, env: dict | None = None
):
    """Run the console script from ``cwd`` (one thread); returns the CompletedProcess."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **ONE_THREAD, **(env or {})}
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


def run_main(args: list[str], cwd: Path, check: bool = True) -> Result:
    """The command's entry function (``resnet_exp.cli.main``) in this process: what the
    console script runs, without the seconds it takes to start Python and import torch."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from resnet_exp import cli

    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv[:], os.getcwd(), os.environ.get("HYDRA_FULL_ERROR"))
    root_handlers, root_level = logging.getLogger().handlers[:], logging.getLogger().level
    code = 0
    try:
        os.environ["HYDRA_FULL_ERROR"] = "0"
        os.chdir(cwd)
        sys.argv = ["resnet-exp", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, cwd_before, full_error = saved
        os.chdir(cwd_before)
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
        GlobalHydra.instance().clear()
        root = logging.getLogger()  # Hydra's job logging replaced the handlers: pytest's back
        for h in root.handlers[:]:
            if h not in root_handlers:
                h.close()
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"resnet-exp {' '.join(args)} failed ({code}):\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def cli():
    return run_cli


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Equal structure, and every tensor equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --- process-wide torch modes, left as each test found them ------------------------


@contextlib.contextmanager
def torch_modes_restored():
    """A run with ``trainer.deterministic=true`` turns on
    ``torch.use_deterministic_algorithms`` (and sets CUBLAS_WORKSPACE_CONFIG), any run
    sets ``cudnn.benchmark``, the GPU tests set cuDNN flags: all process-wide. Restored
    on exit, so an in-process test runs in the same mode alone or after another."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
        cudnn.allow_tf32,
        matmul.allow_tf32,
        torch.get_float32_matmul_precision(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    try:
        yield
    finally:
        det, warn, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, tf32, prec, ws = saved
        torch.use_deterministic_algorithms(det, warn_only=warn)
        matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(prec)
        if ws is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ws


@pytest.fixture(autouse=True)
def restore_torch_modes():
    with torch_modes_restored():
        yield


@pytest.fixture(autouse=True, scope="module")
def restore_torch_modes_after_module():
    """Module-scoped fixtures (a module's reference runs) train outside any one test."""
    with torch_modes_restored():
        yield


# --- MLflow (logger=mlflow) ------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, made once (making its tables takes seconds)."""
    pytest.importorskip("mlflow", reason="pip install '.[mlflow]'")
    from resnet_exp.run.tracking import client

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client(f"sqlite:///{db}")
    return db


@pytest.fixture
def mlflow_store(tmp_path: Path, mlflow_template: Path) -> Path:
    """A copy of the empty store where ``logger=mlflow`` writes by default when the command
    runs in ``tmp_path``: ``mlruns/mlflow.db`` there."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    return db


# --- stopping a run where a test wants it, and comparing what runs computed ----------


def stop_at_poll(polls: int):
    """A StopRequest that asks for a stop at the loop's ``polls``-th poll (once a step,
    after any end-of-epoch work), as a preemption notice calling ``request()`` would."""
    import signal

    from resnet_exp.run.stop import StopRequest

    class StopAt(StopRequest):
        def __init__(self) -> None:
            super().__init__()
            self.left = polls

        @property
        def requested(self) -> bool:
            self.left -= 1
            if self.left == 0:
                self.request(signal.SIGINT)
            return self.signum is not None

    return StopAt()


# How a run ran, not what it computed: left out of comparisons.
WALL_CLOCK = ("wall_time_s", "train_images_per_s", "parts", "time_s")


def run_outcome(run: Path) -> dict[str, Any]:
    """What a run computed: its checkpoint (every owner), metrics.jsonl, TensorBoard
    scalars and summary.json, minus wall-clock values."""
    import json

    from resnet_exp.run.records import read_metrics

    state = torch.load(run / "last.pt", weights_only=False)
    for part in [state, *(state.get("ranks") or [])]:  # a data-parallel run: each rank's too
        part["metrics"].pop("throughput")
    state.pop("clock")
    summary = json.loads((run / "summary.json").read_text())
    return {
        "state": {k: v for k, v in state.items() if k not in ("config", "overrides")},
        "rows": [
            {k: v for k, v in r.items() if k not in WALL_CLOCK}
            for r in read_metrics(run / "metrics.jsonl")
        ],
        "scalars": {k: v for k, v in tb_scalars(run).items() if not k.startswith("throughput")},
        "summary": {k: v for k, v in summary.items() if k not in WALL_CLOCK},
    }
