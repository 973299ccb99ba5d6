"""The Hydra callbacks, all here (registered in configs/config.yaml under ``hydra.callbacks``;
``~hydra.callbacks.NAME`` turns one off).

- ``Reporter`` refuses an output directory that cannot be written before Hydra
  tries to create it, and a sweep on a CIFAR copy that is not there (data/stage.py),
  and ends a sweep with one line naming the jobs that failed
  and a non-zero exit (1), or, when none failed but some were left at the time
  limit (stopped, or not started), one line naming those and how to continue
  (exit 75). It reads each job's ``RunResult`` (run/result.py). The
  jobs themselves never raise (cli.py records a failure in the job's directory
  and returns it): with Hydra's basic sweeper, a raising job stops the sweep
  after its batch and skips ``on_multirun_end``.
- ``SweepOverlay``: after a sweep of ``mode=diagnose`` runs, one figure overlaying them.
- ``WriteReport``: report.md, report.csv and figures in the sweep directory.
- ``RefuseTestSearch``: a search (``hydra/sweeper=search``) needs a validation split.
- ``MlflowTracking``: with ``logger=mlflow``, the tracking store checked before a run
  writes anything, and a sweep's MLflow run, the parent of its jobs' runs
  (run/tracking.py), with the report's files and the sweep's status at its end.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from resnet_exp.errors import UserError
from resnet_exp.run.records import SUMMARY
from resnet_exp.run.result import EXIT_CODES, RunResult, Status, SummaryKey

log = logging.getLogger("resnet_exp")


def check_writable(path: Path, key: str) -> str | None:
    """Why ``path`` cannot become a writable directory, or None if it can."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{key}={str(path)!r} cannot be created: {probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}={str(path)!r} is not writable ({probe} does not allow writing)"
    return None


@contextmanager
def _refusing() -> Iterator[None]:
    """A UserError inside becomes the command's one-line refusal and exit 2 (a callback's
    exceptions become warnings in Hydra; SystemExit is not caught)."""
    try:
        yield
    except UserError as e:
        print(f"resnet-exp: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CODES[Status.failed]) from None


def _refuse(problem: str | None) -> None:
    if problem:
        # A callback's exceptions become warnings in Hydra; SystemExit is not caught.
        print(f"resnet-exp: error: {problem}; pass a writable directory", file=sys.stderr)
        raise SystemExit(2)


def _refuse_settings(config: DictConfig) -> None:
    """A single run's settings and data, checked before Hydra makes its folder: a refused
    run prints its one line and writes nothing (no run folder, no .hydra/, no log)."""
    from resnet_exp.data.stage import require
    from resnet_exp.run import distributed
    from resnet_exp.train.context import validate

    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    with _refusing():
        cfg: Any = OmegaConf.to_object(task)
        validate(cfg, distributed.current())
        require(cfg.data.name, Path(cfg.data.root), cfg.data.download)


def _refuse_missing_data(config: DictConfig) -> None:
    """A sweep on a CIFAR copy that is not in data.root (and cannot be downloaded) stops
    here, before any job is scheduled or the sweep's folder made: not in every job. A
    download happens here once, not in each of the jobs running at once."""
    if config.get("dry_run"):
        return
    if "Slurm" in str(config.hydra.launcher.get("_target_", "")):
        return  # its jobs run on other machines, where data.root may name another folder
    from resnet_exp.data.stage import require

    with _refusing():
        require(str(config.data.name), Path(str(config.data.root)), bool(config.data.download))


class Reporter(Callback):
    def __init__(self) -> None:
        self.jobs: list[tuple[Path, RunResult]] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse(check_writable(Path(config.hydra.run.dir), "hydra.run.dir"))
        _refuse_settings(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse(check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir"))
        if config.hydra.runtime.choices.get("hydra/launcher") == "gpus":
            import torch

            if not torch.cuda.is_available():
                print(
                    "resnet-exp: note: hydra/launcher=gpus, but this machine has no CUDA GPU: "
                    f"the jobs run on the CPU, {config.hydra.launcher.n_jobs} at once",
                    file=sys.stderr,
                )
        _refuse_missing_data(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            e = job_return._return_value  # the property would re-raise it
            result = RunResult(Status.failed, message=f"{type(e).__name__}: {e}")
        elif isinstance(job_return.return_value, RunResult):
            result = job_return.return_value
        else:  # a task function of another kind that returned
            result = RunResult(Status.completed)
        self.jobs.append((Path(config.hydra.runtime.output_dir), result))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        # Launchers that run jobs in other processes call on_job_end there: read the directories.
        dry_run = bool(config.get("dry_run"))
        jobs = self.jobs or _jobs_on_disk(sweep_dir, dry_run)
        failed = [(d, r) for d, r in jobs if not r.ok and not r.resumable]
        left = [(d, r) for d, r in jobs if r.resumable]
        if not failed and not left:
            done = "built (dry run: nothing trained)" if dry_run else "completed"
            log.info("all %d jobs %s (%s)", len(jobs), done, sweep_dir)
            return
        if left:
            names = ", ".join(f"{d.name} ({_status_text(r)})" for d, r in left)
            print(
                f"resnet-exp: {len(left)} of {len(jobs)} jobs left at the time limit: {names}; "
                f"to continue: rerun the same command with resume=auto hydra.sweep.dir={sweep_dir}",
                file=sys.stderr,
            )
        if failed:
            names = ", ".join(f"{d.name} ({_status_text(r)})" for d, r in failed)
            line = (
                f"resnet-exp: {len(failed)} of {len(jobs)} jobs failed: {names}; "
                f"details in their {SUMMARY} and resnet-exp.log under {sweep_dir}"
            )
            print(line, file=sys.stderr)
        raise SystemExit(1 if failed else EXIT_CODES[Status.interrupted])


def _status_text(result: RunResult) -> str:
    if result.status is Status.unfinished:
        return f"no {SUMMARY} (killed?)"
    if result.status is Status.interrupted and result.resumable:
        s = result.summary
        return f"step {s.get(SummaryKey.steps_done)} of {s.get(SummaryKey.steps)}"
    return result.status.value.replace("_", " ")


def _jobs_on_disk(sweep_dir: Path, dry_run: bool = False) -> list[tuple[Path, RunResult]]:
    """Each job's result from its summary.json. A dry run writes none (a completed one
    would make resume=auto skip the job later): a dry-run job without one is done,
    as a failed job writes its summary."""
    jobs = []
    for d in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        if (d / SUMMARY).exists():
            result = RunResult.from_summary(json.loads((d / SUMMARY).read_text()))
        else:
            result = RunResult(Status.completed if dry_run else Status.unfinished)
        jobs.append((d, result))
    return jobs


class SweepOverlay(Callback):
    """After a sweep, overlay the ``mode=diagnose`` runs it holds (others: nothing)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from resnet_exp.modes.diagnose import overlay

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            overlay(sweep_dir)


class WriteReport(Callback):
    """The sweep's report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):
            return  # nothing was trained
        sweep_dir = Path(config.hydra.sweep.dir)
        from resnet_exp.report import write_report

        try:
            written = write_report([sweep_dir], sweep_dir)
        except UserError as e:  # e.g. no job got as far as writing its directory
            print(f"resnet-exp: no report: {e}", file=sys.stderr)
            return
        # print, not log: after the jobs, logging still points at the last job's log file
        print(f"resnet-exp: report in {written[0]}")


class MlflowTracking(Callback):
    """With ``logger=mlflow``: a run's store is reached before Hydra makes its folder (a
    bad URI writes nothing); a training sweep is one MLflow run and each job's run its
    child: the parent is made (or, for a resumed sweep, found) when the multirun starts,
    its id written into the sweep folder for the jobs (any launcher or sweeper) to find."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from resnet_exp.run import distributed

        if not _tracks(config) or not distributed.current().is_main:
            return  # the other ranks of a data-parallel run record nothing
        from resnet_exp.run.tracking import check_store

        with _refusing():
            check_store(_mlflow_uri(config), config.mlflow.experiment)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _tracks(config):
            return
        from resnet_exp.run.tracking import check_mlflow, start_sweep

        hc = config.hydra
        tags = {
            # as typed: an override may hold ${hydra:job.num}, a job's value
            "overrides": " ".join(OmegaConf.to_container(hc.overrides.task, resolve=False)),
            "launcher": str(hc.runtime.choices.get("hydra/launcher")),
            "sweeper": str(hc.runtime.choices.get("hydra/sweeper")),
        }
        with _refusing():
            check_mlflow(config.mlflow.tracking_uri, config.mlflow.experiment)
            start_sweep(
                _mlflow_uri(config), config.mlflow.experiment, Path(str(hc.sweep.dir)), tags
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _tracks(config):
            return
        from resnet_exp.run.tracking import end_sweep

        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = [r for _, r in _jobs_on_disk(sweep_dir)] if sweep_dir.is_dir() else []
        if any(not r.ok and not r.resumable for r in jobs):
            status = Status.failed
        elif any(r.resumable for r in jobs):
            status = Status.interrupted
        else:
            status = Status.completed
        try:
            end_sweep(_mlflow_uri(config), sweep_dir, status)
        except Exception as e:  # the jobs' own runs are recorded; say so, and go on
            print(f"resnet-exp: the sweep's MLflow run was not closed: {e}", file=sys.stderr)


def _mlflow_uri(config: DictConfig) -> str:
    """``mlflow.tracking_uri``, a relative path in it taken from where the command started."""
    from resnet_exp.run.tracking import resolve_uri

    return resolve_uri(config.mlflow.tracking_uri, Path(str(config.hydra.runtime.cwd)))


def _tracks(config: DictConfig) -> bool:
    """A sweep whose jobs record to MLflow: training ones with logger.mlflow on."""
    return bool(
        OmegaConf.select(config, "logger.mlflow")
        and config.get("mode") == "train"
        and not config.get("dry_run")
    )


class RefuseTestSearch(Callback):
    """A search minimises the validation error; without a validation split it would
    select hyper-parameters on the test set, so it is refused before any trial runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from resnet_exp.sweep.search.study import is_search

        if not is_search(config.hydra.sweeper) or config.mode != "train":
            return
        if config.data.val_size == 0:
            print(
                "resnet-exp: error: a hyper-parameter search minimises the validation error, "
                "and data.val_size=0 holds out no validation images (it would select on the "
                "test set); pass data.val_size=5000 (or another number of training images)",
                file=sys.stderr,
            )
            raise SystemExit(2)  # a callback's exceptions become warnings; SystemExit is not
