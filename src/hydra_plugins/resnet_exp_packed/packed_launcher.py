"""``hydra/launcher=packed``: a sweep's jobs trained ``runs_per_device`` at a time
in this process, one thread each, on one device (see resnet_exp/sweep/pack.py).

Each job is prepared in the main thread as Hydra's own ``run_job`` does it
(its config, run directory, ``.hydra/`` files, ``on_job_start``), trained on
its thread through ``resnet_exp.cli.run_job`` (the same per-job error handling
as the basic launcher), and its ``RunResult`` reported with a ``JobReturn`` to
``on_job_end`` in job order, so the sweep's callbacks see what they see with
the basic launcher. A run stopped on request ends the sweep through
``resnet_exp.cli.leave`` once every packed run has stopped.

``trainer.time_limit`` is the sweep's deadline: it counts from the process's
start for every run (each stops on its own, with a checkpoint), and a job
still pending when too little of it is left does not start: it is reported
``not_started`` (no directory is made for it), and ``resume=auto`` starts it
later.

(No ``from __future__ import annotations``: Hydra executes plugin modules
without registering them in sys.modules, where dataclasses look string
annotations up.)
"""

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    env_override,
    filter_overrides,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.resnet_exp_packed.packed_launcher.PackedLauncher"
    runs_per_device: int = 4  # runs trained at once; the next job starts when one ends
    threads_per_run: int = 0  # CPU intra-op threads per run; 0: cores / runs_per_device, >= 1
    device: str = "auto"  # where jobs with trainer.device=auto train: the current GPU, else CPU


ConfigStore.instance().store(
    group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="resnet-exp"
)


@dataclass
class _Job:
    """What the launcher keeps of a job beside the pack's ``PackedJob``."""

    config: DictConfig
    ret: JobReturn = field(default_factory=JobReturn)
    hydra_cfg: Any = None  # the job's Hydra config, handed to its run
    run_cfg: Any = None  # the task's config as trained (trainer.device=auto made the pack's)
    reported: bool = False  # on_job_end called (or skipped: a stopped job)
    logs_closed: bool = False


class PackedLauncher(Launcher):
    def __init__(
        self, runs_per_device: int = 4, threads_per_run: int = 0, device: str = "auto"
    ) -> None:
        self.runs_per_device, self.threads_per_run, self.device = (
            runs_per_device,
            threads_per_run,
            device,
        )
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        import torch
        from hydra.core.hydra_config import HydraConfig

        from resnet_exp.run.stop import process_started
        from resnet_exp.sweep import pack

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if not job_overrides:
            return []
        hydra_cfg_before = HydraConfig.instance().cfg  # restored at the end, as run_job does
        jobs = [self._compose(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        _check_packable(self.runs_per_device, self.threads_per_run, jobs)
        device = pack.pack_device(self.device)
        threads = pack.threads_per_run(self.threads_per_run, min(self.runs_per_device, len(jobs)))
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        where = f"{device}, {threads} thread(s) each" if device.type == "cpu" else str(device)
        log.info(f"Packing {len(jobs)} jobs, {self.runs_per_device} at a time on {where}")

        started = process_started()  # the time limit is the sweep's: the process's start
        logs = pack.RunLogs()
        scheduler = pack.Pack(
            self.runs_per_device,
            device,
            threads,
            start=lambda job: self._start(job, logs, device, started),
            train=_train,
            ended=lambda finished: self._ended(jobs, finished, logs),
        )
        before_threads = torch.get_num_threads()
        # env_set is the same for all jobs (checked): set once for the pack, as run_job does per job
        with env_override(jobs[0].extra.config.hydra.job.env_set):
            logs.configure(jobs[0].extra.config)  # console and levels; files are per run
            try:
                scheduler.run(jobs)
            finally:
                logs.close()
                torch.set_num_threads(before_threads)
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        HydraConfig.instance().cfg = hydra_cfg_before
        stopped = [j.result for j in jobs if j.stopped]
        if stopped:
            from resnet_exp.cli import leave

            leave(stopped[0], multirun=True)  # 128 + N, after every packed run saved
        return [j.extra.ret for j in jobs]

    # --- one job ---------------------------------------------------------------

    def _compose(self, idx: int, overrides: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig

        from resnet_exp.sweep.pack import PackedJob

        assert self.config is not None and self.hydra_context is not None
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the directory names
        output_dir = os.path.join(
            str(OmegaConf.select(config, "hydra.sweep.dir")),
            str(OmegaConf.select(config, "hydra.sweep.subdir")),
        )
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        return PackedJob(idx, Path(output_dir).name, extra=_Job(config))

    def _start(self, job: Any, logs: Any, device: Any, started: float) -> bool:
        """A job about to start, in the main thread: too late for its time limit (False),
        or prepared as hydra.core.utils.run_job prepares one (directory, .hydra/ files,
        its log file, on_job_start)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import _save_config

        from resnet_exp.sweep.pack import PackedStop

        assert self.hydra_context is not None
        if _too_late(job, started):
            return False
        config, ret = job.extra.config, job.extra.ret
        HydraConfig.instance().set_config(config)
        task_cfg = copy.deepcopy(config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret.cfg = task_cfg
        run_cfg = copy.deepcopy(task_cfg)
        OmegaConf.resolve(run_cfg)  # ${hydra:...} here, with this job's Hydra config current
        if device.type == "cuda" and task_cfg.trainer.device == "auto":
            run_cfg.trainer.device = str(device)  # the pack's GPU, not one claimed per run
        ret.hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
        ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)  # type: ignore[assignment]
        output_dir = Path(str(config.hydra.runtime.output_dir))
        output_dir.mkdir(parents=True, exist_ok=True)
        ret.working_dir = os.getcwd()
        logs.add(f"packed-run-{job.idx}", job.name, config)
        if config.hydra.output_subdir is not None:
            hydra_output = output_dir / str(config.hydra.output_subdir)
            _save_config(task_cfg, "config.yaml", hydra_output)
            _save_config(ret.hydra_cfg, "hydra.yaml", hydra_output)
            _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
        self.hydra_context.callbacks.on_job_start(config=config, task_function=self.task_function)
        job.extra.hydra_cfg = HydraConfig.instance().cfg.hydra
        job.extra.run_cfg = run_cfg
        job.stop = PackedStop(started=started)
        return True

    def _ended(self, jobs: list[Any], finished: list[Any], logs: Any) -> None:
        """on_job_end for each finished job once those before it have ended, as the
        basic launcher calls it (Reporter lists failed jobs in job order)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobRuntime

        assert self.hydra_context is not None
        for job in finished:
            if not job.extra.logs_closed:
                job.extra.logs_closed = True
                logs.remove(f"packed-run-{job.idx}")
        for job in jobs:
            if job not in finished:
                return
            if job.extra.reported:
                continue
            job.extra.reported = True
            if job.stopped:
                continue  # a stopped job ends the sweep without on_job_end, as with the basic launcher
            HydraConfig.instance().set_config(job.extra.config)
            job.extra.ret.task_name = JobRuntime.instance().get("name")
            self.hydra_context.callbacks.on_job_end(
                config=job.extra.config, job_return=job.extra.ret
            )


def _train(job: Any) -> Any:
    """A run's thread: the ordinary per-job entry, with its own Hydra config and stop flag."""
    from resnet_exp import cli

    ret = job.extra.ret
    try:
        result = cli.run_job(job.extra.run_cfg, job.extra.hydra_cfg, job.stop)
        ret.return_value, ret.status = result, JobStatus.COMPLETED
        return result
    except Exception as e:
        ret.return_value, ret.status = e, JobStatus.FAILED
        return None


def _too_late(job: Any, started: float) -> bool:
    """Too little of the job's time limit is left to start it: it gets a ``not_started``
    result (reported to on_job_end in its turn) and no directory."""
    from resnet_exp.cli import too_late
    from resnet_exp.run.stop import StopRequest

    c = job.extra.config
    if c.mode != "train" or c.dry_run:
        return False
    late = too_late(c.trainer.time_limit, StopRequest(started=started))
    if late is None:
        return False
    job.result = job.extra.ret.return_value = late
    job.extra.ret.status = JobStatus.COMPLETED
    log.info(f"#{job.idx} {job.name}: {late.message}")
    return True


def _check_packable(runs: int, threads: int, jobs: list[Any]) -> None:
    """What a pack cannot give each run on its own: refuse it before anything is written."""
    from resnet_exp.errors import UserError

    if runs < 1:
        raise UserError(f"hydra.launcher.runs_per_device={runs} must be at least 1")
    if threads < 0:
        raise UserError(f"hydra.launcher.threads_per_run={threads} must be 0 (auto) or more")
    first = jobs[0].extra.config if jobs else None
    for job in jobs:
        if job.extra.config.hydra.job.chdir:
            raise UserError(
                "hydra.job.chdir=true cannot be packed: the working directory is one per process"
            )
        for key in ("trainer.deterministic", "hydra.job.env_set"):
            a, b = OmegaConf.select(first, key), OmegaConf.select(job.extra.config, key)
            if a != b:
                raise UserError(
                    f"{key} differs between jobs {jobs[0].name} ({a}) and {job.name} ({b}); it is "
                    f"one setting per process: pack such jobs in separate sweeps"
                )
