"""Shared test helpers: the tiny jobs, composing configs (presets once a session), running
the command (in this process; in a fresh one, forked from tests/forkserver.py; as the
installed console script; under torchrun; from a wheel), reading a run's files (summary,
metrics, checkpoint, TensorBoard scalars) without their wall-clock values, nets' parameter
counts, small image folders, one CPU thread, torch's process-wide modes restored."""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from forkserver import Forked, ForkServer, Result

from resnet_exp import build_model, count_params
from resnet_exp.models.units import Block
from resnet_exp.run.checkpoint import CHECKPOINT, Checkpoint
from resnet_exp.run.records import read_metrics

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

# A tiny ImageNet-family job (ResNet-18 at width 8, 32 px crops, a 48 px test view),
# streamed from an image folder (``write_image_folder``; add ``data.root=``).
TINY_IMAGENET = [
    "dataset=imagenet",
    "depth=18",
    "model.width=8",
    "data.image_size=32",
    "data.eval_crops=[32,48]",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.workers=0",
    "trainer.device=cpu",
    "trainer.progress=false",
]

# Subprocesses on one thread: fast on a busy 2-core machine, bit-exact across processes.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

# Three ImageNet class folders (the first three synsets).
IMAGENET_CLASSES = ("n01440764", "n01443537", "n01484850")


# --- session-wide -----------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """This process on one thread too: the suite shares two cores with other jobs, and two
    OpenMP threads then wait on each other (a ResNet-20 step measured 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def cifar10_root() -> Path | None:
    return CIFAR10 if (CIFAR10 / "train").is_dir() and (CIFAR10 / "test").is_dir() else None


# --- configs ----------------------------------------------------------------------------


@contextlib.contextmanager
def hydra_configs() -> Iterator[None]:
    """The project's configs open for Hydra's ``compose`` in this block (or the ones a
    module opened already)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from resnet_exp.cli import config_dir

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield


def compose_config(overrides: list[str]) -> Any:
    """The Config the command would build from these overrides (no run directory)."""
    from hydra import compose
    from omegaconf import OmegaConf

    with hydra_configs():
        return OmegaConf.to_object(compose("config", overrides=overrides))


@functools.cache
def preset_jobs(experiment: str, scale: str) -> tuple[tuple[str, ...], ...]:
    """The override lists of a preset's jobs at a scale, every seed, as Hydra's basic
    sweeper expands them."""
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    base = [f"+experiment={experiment}", f"scale={scale}"]
    with hydra_configs():
        cfg = compose("config", overrides=base, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return tuple((*base, *job) for job in batch)


@functools.cache
def _composed(overrides: tuple[str, ...]) -> Any:
    return compose_config(list(overrides))


def preset_config(overrides: tuple[str, ...]) -> Any:
    """``compose_config`` of a preset's job, composed once a session (composing is slow:
    0.1-0.4 s a job, and several modules build the same presets): a copy to change."""
    return copy.deepcopy(_composed(overrides))


# --- the command: in this process, in a fresh one, under torchrun, from a wheel ---------


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


def console_script() -> str:
    """The installed `resnet-exp`, next to this interpreter."""
    path = Path(sys.executable).parent / "resnet-exp"
    return str(path) if path.exists() else shutil.which("resnet-exp") or "resnet-exp"


def command_env(env: dict | None = None) -> dict[str, str]:
    """The environment a command runs in: this one, one thread, Hydra's short errors."""
    return {**os.environ, "HYDRA_FULL_ERROR": "0", **ONE_THREAD, **(env or {})}


def run_cli(
    args: list[str], cwd: Path, check: bool = True, timeout: int = 600, env: dict | None = None
) -> Result:
    """Run the installed console script from ``cwd`` (one thread): its exit status and
    output. (``run_command``: the same script in a process forked from a server.)"""
    proc = subprocess.run(
        [console_script(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=command_env(env),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"resnet-exp {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return Result(proc.returncode, proc.stdout, proc.stderr)


# Optional extras that start threads when imported (MLflow, ONNX Runtime): a process
# forked while another thread holds a lock can hang on it, so the server leaves them out
# (src/ imports them lazily, where they are used).
THREADED = ("mlflow", "onnxruntime", "onnx", "onnxscript")


@functools.cache
def src_libraries() -> list[str]:
    """The modules outside the project and the standard library that src/ imports (but
    the THREADED extras)."""
    names: set[str] = set()
    for path in (REPO / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module)
    own = ("resnet_exp", "hydra_plugins")
    skip = (*sys.stdlib_module_names, *own, *THREADED)
    return sorted(n for n in names if n.split(".")[0] not in skip)


_SERVERS: list[ForkServer] = []


def fork_server() -> ForkServer:
    """The session's fork server (tests/forkserver.py), started at first use: it loads
    the libraries src/ imports (seconds: torch, torchvision, Hydra, matplotlib), never
    the project; each child then starts in a fraction of a second."""
    if not _SERVERS:
        _SERVERS.append(ForkServer(console_script(), src_libraries(), command_env()))
    return _SERVERS[0]


# What a test module imports to run the command in a fresh process.
FORKING = {"fork_server", "start_command", "run_command", "signal_after_first_evaluation"}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the fork server now if a collected test will use it: its seconds of loading
    the libraries then pass while the first tests run."""
    modules = {item.module for item in session.items if isinstance(item, pytest.Function)}
    if any(FORKING & vars(m).keys() for m in modules):
        fork_server()


@pytest.fixture(autouse=True, scope="session")
def close_fork_server() -> Iterator[None]:
    yield
    for server in _SERVERS:
        server.close()


def start_command(args: list[str], cwd: Path, env: dict | None = None) -> Forked:
    """The installed console script with ``args``, from ``cwd``, in a fresh process of
    its own (its pid, signals, exit status, output), started and returned at once."""
    return fork_server().start(args, cwd, command_env(env))


def run_command(args: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> Result:
    """``start_command``, then its exit status and output."""
    return start_command(args, cwd, env).result(check)


def signal_after_first_evaluation(
    args: list[str], cwd: Path, metrics: list[Path], signum: int
) -> tuple[int, str]:
    """Start the command in a fresh process (``start_command``), wait until every
    ``metrics`` file holds a complete line (a file, not a time: the run is in its loop,
    its handlers installed), send ``signum``; the exit status and what it wrote to stderr."""
    proc = start_command(args, cwd)
    try:
        deadline = time.monotonic() + 300
        while not all(m.exists() and m.read_text().endswith("\n") for m in metrics):
            assert time.monotonic() < deadline and proc.poll() is None, proc.result().stderr
            time.sleep(0.01)
        proc.send_signal(signum)
        done = proc.result(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    return done.returncode, done.stderr


def torchrun(args: list[str], cwd: Path, timeout: int = 600) -> Result:
    """The command under ``torchrun --standalone --nproc_per_node=2`` (one thread a
    process); it must succeed."""
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*launcher, "-m", "resnet_exp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ONE_THREAD},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and installed (a regular install, not the editable
    one) into a folder of its own, once a session: that folder."""
    wheels, site = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(wheels.glob("resnet_exp-*.whl"))
    subprocess.run(
        [*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return site


def run_installed(site: Path, code: str, cwd: Path) -> Result:
    """Python ``code`` with the installed wheel (``installed_wheel``) alone on its path."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Result(proc.returncode, proc.stdout, proc.stderr)


# --- a run's files ----------------------------------------------------------------------


def tb_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar of a run: tag -> {step: value} (a resume rewrites steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_summary(run: Path) -> dict[str, Any]:
    """A run's summary.json."""
    return json.loads((run / "summary.json").read_text())


def read_checkpoint(run: Path) -> dict[str, Any]:
    """The state a run directory's last.pt (or a checkpoint file) holds, read as the
    command reads it (``Checkpoint.load``: a broken or foreign file fails here too)."""
    return Checkpoint.load(run / CHECKPOINT if run.is_dir() else run).state


# What two runs of the same computation may differ in: measured times and speeds, in
# summary.json (wall_time_s, train_images_per_s), metrics.jsonl (time_s), report.csv
# (images_per_s, wall_time_s), the checkpoint's running metrics (throughput) and the
# TensorBoard tags under throughput/.
WALL_CLOCK = frozenset(
    {"time_s", "wall_time_s", "images_per_s", "train_images_per_s", "throughput", "parts"}
)


def without_wall_clock(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without its wall-clock entries (a key, or a tag's first part, in WALL_CLOCK)."""
    return {k: v for k, v in values.items() if k.split("/", 1)[0] not in WALL_CLOCK}


# The checkpoint entries a run computes (the rest: its config, overrides, process count,
# clock, where it was made); ema and ranks where the run has them.
COMPUTED = (
    *("model", "optimizer", "scheduler", "scaler", "loader", "rng", "step", "metrics"),
    *("ema", "ema_buffers", "ranks"),
)


def outcome(run: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a run computed: its checkpoint's state (the COMPUTED entries but ``skip``),
    metrics rows, summary and TensorBoard curves, without wall-clock values; equal
    (``assert_same_tensors``) for two runs of the same computation."""
    state = read_checkpoint(run)
    for part in [state, *(state.get("ranks") or [])]:  # a data-parallel run: each rank's too
        part["metrics"] = without_wall_clock(part["metrics"])
    return {
        "state": {k: state[k] for k in COMPUTED if k in state and k not in skip},
        "rows": [without_wall_clock(r) for r in read_metrics(run / "metrics.jsonl")],
        "summary": without_wall_clock(read_summary(run)),
        "scalars": without_wall_clock(tb_scalars(run)),
    }


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


# --- nets and images --------------------------------------------------------------------


def params_of(block: str, depth: int, *args: Any, on: str = "cpu", **kw: Any) -> int:
    """The parameter count of ``build_model(block, depth, *args, **kw)`` built on the
    ``on`` device: ``meta`` (no memory, no init: ImageNet's wide nets, 60M parameters)
    or the CPU (CIFAR's thousand narrow layers build 2-4x faster there than under the
    meta device, whose every call goes through Python)."""
    with contextlib.nullcontext() if on == "cpu" else torch.device(on):
        return count_params(build_model(block, depth, *args, **kw))


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """``root/<split>/<class>/*.JPEG`` of IMAGENET_CLASSES, random sizes (24-90 px a
    side, aspect 1:3 to 3:1); the first training image is a PNG."""
    from torchvision.io import encode_jpeg, encode_png, write_file

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in IMAGENET_CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(24, 90, 2))
                img = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
                if split == "train" and c == IMAGENET_CLASSES[0] and i == 0:
                    write_file(str(root / split / c / f"{c}_{i}.png"), encode_png(img))
                else:
                    write_file(str(root / split / c / f"{c}_{i}.JPEG"), encode_jpeg(img))
    return root


# --- process-wide torch modes, left as each test found them -----------------------------


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
