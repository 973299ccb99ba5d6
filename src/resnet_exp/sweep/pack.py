"""Several runs of a sweep trained at once in one process, one thread each.

The packed launcher (``hydra/launcher=packed``, in ``hydra_plugins/resnet_exp_packed``)
calls the ordinary per-run entry, ``resnet_exp.cli.run_job`` → ``Trainer(cfg, run_dir,
stop).run()``, on one thread per run, and reads the ``RunResult`` it returns. What the runs share is the process; this module
keeps each run's view of it its own:

- **Set-up, one run at a time** (:class:`SetupGate`): seeding and model init use
  torch's global RNG, and ``seed_everything`` sets process-wide cuDNN and
  determinism switches, so a run sets up (and takes its first step, which
  captures its CUDA graph) alone; its init then equals the run alone. The
  train loader draws from its own ``torch.Generator``.
- **The stop flag** (:class:`PackedStop`): signals reach the main thread only;
  the launcher's handler forwards the stop to each run's flag. The loop enters
  ``stop.installed()`` when its set-up is done and reads ``stop.requested``
  once after every step, which is how the gate learns a run's exclusive phase
  has ended — nothing else of the loop is touched.
- **Scheduling** (:class:`Pack`): ``runs_per_device`` jobs at a time, one thread
  each, the next started when one ends; the launcher says what starting, training
  and reporting a job means (each job gets its own Hydra config handed in:
  nothing reads Hydra's global state from a run's thread).
- **Logs** (:class:`RunLogs`): a run's log file receives only its thread's
  records; the console receives all of them, prefixed with the run's name.
- **Devices** (:func:`run_on`): on a GPU each run issues its work on its own
  CUDA stream; on the CPU the intra-op thread count is set for all runs
  (``threads_per_run``) so that they do not oversubscribe the cores.
"""

from __future__ import annotations

import logging
import logging.config
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from resnet_exp.run.stop import StopRequest


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_run(requested: int, runs: int) -> int:
    """``0`` (auto): the cores shared evenly by the runs that train at once, at least one."""
    return requested if requested > 0 else max(1, cpu_cores() // max(1, runs))


class SetupGate:
    """Lets one run at a time through its set-up and first step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def held(self) -> Iterator[Callable[[], None]]:
        """Hold the gate; the yielded callable lets it go early (at most once)."""
        self._lock.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._lock.release()

        try:
            yield release
        finally:
            release()


class PackedStop(StopRequest):
    """A packed run's stop flag; its first read in training ends the run's set-up.

    ``installed()`` is entered by the loop once the run is built (in a worker
    thread it installs no handler: the launcher's main thread owns the signals
    and calls :meth:`request`); the loop reads ``requested`` after each step, so
    the first read after that follows the first step.
    """

    def __init__(self, started: float | None = None) -> None:
        super().__init__(started)
        self.on_ready: Callable[[], None] | None = None
        self._training = False

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        self._training = True
        with super().installed():
            yield self

    @property
    def requested(self) -> bool:
        if self._training and self.on_ready is not None:
            ready, self.on_ready = self.on_ready, None
            ready()
        return super().requested


class ForwardingStop(StopRequest):
    """The pack's own flag, whose signal handler (in the main thread) passes a
    stop on to every running run at once; a second signal still aborts."""

    def __init__(self, runs: Callable[[], list[StopRequest]]) -> None:
        super().__init__()
        self.runs = runs

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        super()._handle(signum, frame)
        for stop in self.runs():
            stop.request(signum)


@dataclass(eq=False)
class PackedJob:
    """One job of a pack: its number and name, and, once it ran, its result."""

    idx: int
    name: str
    stop: PackedStop | None = None
    thread: threading.Thread | None = None
    result: Any = None  # its RunResult, once trained (or not started)
    extra: Any = None  # the launcher's own record of the job

    @property
    def stopped(self) -> bool:
        """Stopped on request (Ctrl-C, SIGTERM): it ends the sweep."""
        return self.result is not None and self.result.stop_requested


@dataclass
class Pack:
    """The scheduling of a pack: ``runs`` jobs at a time, each on its own thread, the
    next one started when one ends; a stop request reaches every running job and
    starts no other. What a job is (its set-up, its training, its report) is the
    launcher's: ``start`` prepares a job in the main thread (False: it does not start,
    e.g. too little of the time limit is left), ``train`` trains it on its thread and
    returns its result, ``ended`` hears the jobs that ended so far, in job order."""

    runs: int
    device: torch.device
    threads: int
    start: Callable[[PackedJob], bool]
    train: Callable[[PackedJob], Any]
    ended: Callable[[list[PackedJob]], None]

    def run(self, jobs: list[PackedJob]) -> None:
        pending, running, finished = deque(jobs), [], []
        gate, changed = SetupGate(), threading.Event()
        stop = ForwardingStop(lambda: [j.stop for j in running])
        with stop.installed():  # the main thread owns SIGINT/SIGTERM
            while pending or running:
                while pending and len(running) < self.runs and not stop.requested:
                    job = pending.popleft()
                    if not self.start(job):
                        finished.append(job)
                        continue
                    job.thread = threading.Thread(
                        target=self._train,
                        args=(job, gate, changed),
                        name=f"packed-run-{job.idx}",
                        daemon=True,  # a second signal exits at once, mid-step
                    )
                    job.thread.start()
                    running.append(job)
                if stop.requested:
                    pending.clear()  # as the basic launcher: later jobs do not start
                    for job in running:
                        job.stop.request(stop.signum)  # type: ignore[union-attr]
                changed.wait(0.1)  # signal handlers run in between
                changed.clear()
                for job in [j for j in running if not j.thread.is_alive()]:
                    running.remove(job)
                    finished.append(job)
                self.ended(finished)

    def _train(self, job: PackedJob, gate: SetupGate, changed: threading.Event) -> None:
        """A run's thread: its gate, its device stream or threads, its own stop flag."""
        try:
            assert job.stop is not None
            with packed_run(gate, job.stop, self.device, self.threads):
                job.result = self.train(job)
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            changed.set()


class _ThreadFilter(logging.Filter):
    def __init__(self, thread_name: str) -> None:
        super().__init__()
        self.thread_name = thread_name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName == self.thread_name


class _Prefixed(logging.Formatter):
    """The console's format with the run's name in front of a packed run's records."""

    def __init__(self, inner: logging.Formatter | None, labels: dict[str, str]) -> None:
        super().__init__()
        self.inner, self.labels = inner or logging.Formatter(), labels

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        label = self.labels.get(record.threadName or "")
        return f"[{label}] {text}" if label else text


def _file_handler_names(conf: dict[str, Any]) -> list[str]:
    handlers = conf.get("handlers") or {}
    root = (conf.get("root") or {}).get("handlers") or []
    return [h for h in root if "filename" in (handlers.get(h) or {})]


class RunLogs:
    """Per-run log files in one process.

    The job logging config (``hydra.job_logging``) is applied once without its
    file handlers (console, levels); each run then gets its own file handlers,
    built from its job's config (so ``${hydra.runtime.output_dir}`` is its
    directory) and filtered to its thread's records.
    """

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}
        self.handlers: dict[str, list[logging.Handler]] = {}

    def configure(self, job_config: DictConfig) -> None:
        from hydra.core.utils import configure_log

        conf = OmegaConf.to_container(job_config.hydra.job_logging, resolve=True)
        assert isinstance(conf, dict)
        files = set(_file_handler_names(conf))
        if files:  # (hydra/job_logging=disabled has no root logger config at all)
            conf["root"]["handlers"] = [h for h in conf["root"]["handlers"] if h not in files]
            conf["handlers"] = {k: v for k, v in conf["handlers"].items() if k not in files}
        configure_log(OmegaConf.create(conf), job_config.hydra.verbose)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_Prefixed(handler.formatter, self.labels))

    def add(self, thread_name: str, label: str, job_config: DictConfig) -> None:
        conf = OmegaConf.to_container(job_config.hydra.job_logging, resolve=True)
        assert isinstance(conf, dict)
        formats = conf.get("formatters") or {}
        root = logging.getLogger()
        made = []
        for name in _file_handler_names(conf):
            spec = dict(conf["handlers"][name])
            cls = logging.config.BaseConfigurator({}).resolve(spec.pop("class"))
            fmt = formats.get(spec.pop("formatter", None)) or {}
            level = spec.pop("level", None)
            spec.pop("filters", None)
            handler = cls(**spec)
            handler.setFormatter(
                logging.Formatter(fmt.get("format"), fmt.get("datefmt"), fmt.get("style", "%"))
            )
            if level is not None:
                handler.setLevel(level)
            handler.addFilter(_ThreadFilter(thread_name))
            root.addHandler(handler)
            made.append(handler)
        self.labels[thread_name] = label
        self.handlers[thread_name] = made

    def remove(self, thread_name: str) -> None:
        root = logging.getLogger()
        for handler in self.handlers.pop(thread_name, []):
            root.removeHandler(handler)
            handler.close()
        self.labels.pop(thread_name, None)

    def close(self) -> None:
        for name in list(self.handlers):
            self.remove(name)


def pack_device(name: str) -> torch.device:
    """The device a pack trains on (``hydra.launcher.device``): ``auto`` is the
    current CUDA device, else the CPU."""
    if name == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    return torch.device(name)


@contextmanager
def run_on(device: torch.device, threads: int) -> Iterator[None]:
    """A packed run's thread: its own CUDA stream on a GPU (the loop, its CUDA
    graph and its evaluations all issue work on the current stream); on the CPU,
    ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
        yield


@contextmanager
def packed_run(
    gate: SetupGate, stop: PackedStop, device: torch.device, threads: int
) -> Iterator[None]:
    """The context of a packed run's thread, around its ``Trainer(cfg, run_dir, stop)``:
    the gate held through set-up and the first step, its device stream or threads."""
    with gate.held() as ready, run_on(device, threads):
        stop.on_ready = ready
        yield
