"""Hydra callbacks (registered in configs/config.yaml under ``hydra.callbacks``).

``Reporter`` refuses an output directory that cannot be written before Hydra
tries to create it, and ends a sweep with one line naming the jobs that failed
and a non-zero exit. The jobs themselves never raise (cli.py records a failure
in the job's directory and returns it): with Hydra's basic sweeper, a raising
job stops the sweep after its batch and skips ``on_multirun_end``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from resnet_exp.train.records import SUMMARY

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


def _refuse(problem: str | None) -> None:
    if problem:
        # A callback's exceptions become warnings in Hydra; SystemExit is not caught.
        print(f"resnet-exp: error: {problem}; pass a writable directory", file=sys.stderr)
        raise SystemExit(2)


class Reporter(Callback):
    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse(check_writable(Path(config.hydra.run.dir), "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse(check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir"))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job = {"dir": Path(config.hydra.runtime.output_dir), "status": "completed", "error": None}
        if job_return.status == JobStatus.FAILED:
            e = job_return._return_value  # the property would re-raise it
            job.update(status="failed", error=f"{type(e).__name__}: {e}")
        elif isinstance(job_return.return_value, dict):
            job.update(
                status=job_return.return_value.get("status", "completed"),
                error=job_return.return_value.get("error"),
            )
        self.jobs.append(job)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        # Launchers that run jobs in other processes call on_job_end there: read the directories.
        jobs = self.jobs or _jobs_on_disk(sweep_dir)
        failed = [j for j in jobs if j["status"] != "completed"]
        if not failed:
            log.info("all %d jobs completed (%s)", len(jobs), sweep_dir)
            return
        names = ", ".join(f"{j['dir'].name} ({j['status']})" for j in failed)
        line = (
            f"resnet-exp: {len(failed)} of {len(jobs)} jobs failed: {names}; "
            f"details in their {SUMMARY} and resnet-exp.log under {sweep_dir}"
        )
        print(line, file=sys.stderr)
        raise SystemExit(1)


def _jobs_on_disk(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for d in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        status, error = "no summary.json (killed?)", None
        if (d / SUMMARY).exists():
            summary = json.loads((d / SUMMARY).read_text())
            status, error = summary.get("status", status), summary.get("error")
        jobs.append({"dir": d, "status": status, "error": error})
    return jobs
