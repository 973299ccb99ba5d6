"""A training run in MLflow (``logger=mlflow``), beside its TensorBoard files (run/records.py).

``RunRecords`` forwards to an ``MlflowRun``: the run's config as params when it starts,
every scalar it writes (the train loss per ``log_every`` steps, lr, images/s) and every
evaluation (``test/error``, ``test/loss``) as metrics at the training step, and at its end
its status (MLflow's and a ``status`` tag), summary.json's results as metrics, and
summary.json and metrics.jsonl as artifacts.

Everything goes through ``MlflowClient`` with explicit run ids, never the fluent API
(``mlflow.start_run``): that one keeps an active run per thread, and packed runs share a
process (sweep/pack.py).

A resumed run continues its MLflow run: ``Tracking`` is a state owner of the run
(train/state.py), so the id goes into last.pt as a plain str. A sweep is one MLflow run
whose children are its jobs' runs (``mlflow.parentRunId``): ``callbacks.MlflowTracking``
makes it when the multirun starts and writes its id into the sweep folder (``PARENT_FILE``),
where ``cli.context`` finds it for each job; a resumed sweep reuses it.

mlflow is imported here only, and only when a run records to it (its import takes seconds).
Nothing is sent anywhere but to ``mlflow.tracking_uri``: MLflow's usage telemetry is off
unless ``MLFLOW_DISABLE_TELEMETRY`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnet_exp.config import Config, Mode, flat_config
from resnet_exp.errors import UserError
from resnet_exp.run.result import Status, SummaryKey

log = logging.getLogger("resnet_exp")

PARENT_FILE = "mlflow_run.json"  # in a sweep folder: its MLflow run (the jobs' parent)
PARENT_TAG = "mlflow.parentRunId"  # how MLflow (and its UI) nests a child run
STATUS_TAG = "status"  # summary.json's status: completed, interrupted, diverged, ...
# How each ending shows in MLflow's own run status.
RUN_STATUS = {
    Status.completed: "FINISHED",
    Status.pruned: "FINISHED",  # did what a search's trial is asked; the tag says pruned
    Status.interrupted: "KILLED",  # resumable: a resume sets it RUNNING again
}
# Config keys that say how the command was run, not what: no params (a resume changes them).
NOT_PARAMS = ("resume", "dry_run", "trust_checkpoint")  # how to run, not what
# summary.json's results logged as metrics at the run's end (the run's description stays out).
FINAL_METRICS = (
    SummaryKey.test_loss,
    SummaryKey.test_error,
    SummaryKey.train_images_per_s,
    SummaryKey.wall_time_s,
    SummaryKey.steps_done,
    SummaryKey.diverged_at_step,
    SummaryKey.pruned_at_epoch,
)
# A sweep folder's files recorded with its MLflow run: the report, its figures, the search's.
SWEEP_ARTIFACTS = (".md", ".csv", ".png", ".svg", ".pdf", ".html", ".yaml")


@dataclass(frozen=True)
class SweepJob:
    """A sweep's job: the sweep folder and the job's number (read from Hydra by cli.py)."""

    dir: Path
    num: int


@dataclass(frozen=True)
class MlflowTarget:
    """Where and as what a run is recorded in MLflow."""

    uri: str  # mlflow.tracking_uri, a relative path in it made absolute
    experiment: str
    run_name: str
    params: dict[str, str] = field(default_factory=dict)  # the run's config, dotted keys
    tags: dict[str, str] = field(default_factory=dict)


class Tracking:
    """Where a training run's records go besides metrics.jsonl and summary.json: TensorBoard
    files, an MLflow run (``mlflow``: None, off). Also a state owner of the run: ``run_id``,
    the MLflow run it writes to, goes into last.pt (kept when MLflow is off, for a later
    resume with it on)."""

    def __init__(self, tensorboard: bool = True, mlflow: MlflowTarget | None = None) -> None:
        self.tensorboard, self.mlflow = tensorboard, mlflow
        self.run_id: str | None = None

    @classmethod
    def of(
        cls, cfg: Config, run_dir: Path, sweep: SweepJob | None = None, cwd: Path | None = None
    ) -> Tracking:
        """What ``cfg.logger`` asks for; a sweep's job is a child of the sweep's MLflow run.
        ``cwd``: where the command was started (a relative tracking_uri is taken from there)."""
        if not (cfg.logger.mlflow and cfg.mode is Mode.train and not cfg.dry_run):
            return cls(cfg.logger.tensorboard)
        uri = resolve_uri(cfg.mlflow.tracking_uri, cwd)
        params = {k: str(v) for k, v in flat_config(cfg).items() if k not in NOT_PARAMS}
        tags = {"run_dir": str(run_dir.resolve()), "host": socket.gethostname()}
        if sweep is not None:
            tags.update(sweep_dir=str(sweep.dir.resolve()), job=str(sweep.num))
            parent = sweep_parent(sweep.dir, uri)
            if parent is not None:
                tags[PARENT_TAG] = parent
        target = MlflowTarget(uri, cfg.mlflow.experiment, run_dir.name, params, tags)
        return cls(cfg.logger.tensorboard, target)

    def state_dict(self) -> str | None:
        return self.run_id

    def load_state_dict(self, state: Any) -> None:
        self.run_id = state if isinstance(state, str) else None


def check_tracking(cfg: Config) -> None:
    """``logger=mlflow``'s settings and package, before anything is written."""
    if cfg.logger.mlflow and cfg.mode is Mode.train:
        check_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)


def check_mlflow(tracking_uri: str, experiment: str) -> None:
    """``mlflow.*`` set, and the package there, without importing it."""
    for key, value in (
        ("tracking_uri", tracking_uri),
        ("experiment", experiment),
    ):
        if not str(value).strip():
            raise UserError(f"mlflow.{key}={value!r} is empty: logger=mlflow needs one")
    if not _installed("mlflow"):
        raise UserError(
            "logger=mlflow needs the mlflow package, which is not installed: "
            "pip install 'resnet-exp[mlflow]' (or leave logger=tensorboard)"
        )


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None (no spec): not importable
        return False


def resolve_uri(uri: str, cwd: Path | None = None) -> str:
    """``mlflow.tracking_uri`` with a relative path made absolute (a sweep's jobs may run
    elsewhere): ``sqlite:///mlruns/mlflow.db`` and a plain folder; other URIs as they are."""
    base = cwd or Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri[len("sqlite:///") :]).resolve())
    if "://" not in uri and ":" not in uri.split("/", 1)[0]:  # a path: MLflow's file store
        return str((base / uri).resolve())
    return uri


def _local_artifacts(uri: str) -> str | None:
    """Where a local store keeps artifacts: ``artifacts/`` beside the SQLite file (MLflow's
    own default is relative to each process's working directory); a server decides its own."""
    if uri.startswith("sqlite:////"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (the store made if it is a new SQLite file)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise UserError(
            "logger=mlflow needs the mlflow package, which is not installed: "
            "pip install 'resnet-exp[mlflow]'"
        ) from None
    try:
        made = MlflowClient(tracking_uri=uri)
        made.search_experiments(max_results=1)  # reach the store now, not mid-run
    except Exception as e:  # a bad URI, an unreachable server, an unwritable folder
        raise unusable(uri, e) from e
    return made


def unusable(uri: str, e: BaseException) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"mlflow.tracking_uri={uri!r} cannot be used: {first[:300]}")


def check_store(uri: str, experiment: str) -> None:
    """The store reached and the experiment able to take runs (missing: made later), before
    a run writes anything."""
    mlflow = client(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
    except Exception as e:
        raise unusable(uri, e) from e
    if found is not None:
        _active(found, experiment, uri)


def experiment_id(mlflow: Any, name: str, uri: str) -> str:
    """The experiment ``name``'s id, made if missing (another job may make it meanwhile)."""
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow.create_experiment(name, artifact_location=_local_artifacts(uri))
        except Exception:
            found = mlflow.get_experiment_by_name(name)
            if found is None:
                raise
    return _active(found, name, uri)


def _active(found: Any, name: str, uri: str) -> str:
    if found.lifecycle_stage != "active":
        raise UserError(
            f"mlflow.experiment={name!r} is deleted in {uri}: restore it "
            f"(mlflow experiments restore) or pass another name"
        )
    return found.experiment_id


def existing_run(mlflow: Any, run_id: str | None) -> Any:
    """The run ``run_id`` if this store holds it (and it is not deleted), else None."""
    if run_id is None:
        return None
    try:
        run = mlflow.get_run(run_id)
    except Exception:  # not in this store (another tracking_uri)
        return None
    return run if run.info.lifecycle_stage == "active" else None


class MlflowRun:
    """One training run's MLflow run, written by run id. A failure to record mid-run is
    logged once and ends the recording, not the training (metrics.jsonl keeps everything)."""

    def __init__(self, mlflow: Any, run_id: str) -> None:
        self.mlflow, self.run_id = mlflow, run_id
        self.ended = False
        self.broken = False

    @classmethod
    def open(cls, tracking: Tracking) -> MlflowRun:
        """Start the run's MLflow run, or continue the one its checkpoint names."""
        t = tracking.mlflow
        assert t is not None
        mlflow = client(t.uri)
        try:
            run = existing_run(mlflow, tracking.run_id)
            if run is None:
                if tracking.run_id is not None:
                    log.info(
                        "MLflow run %s is not in %s: recording to a new one", tracking.run_id, t.uri
                    )
                exp = experiment_id(mlflow, t.experiment, t.uri)
                run = mlflow.create_run(exp, run_name=t.run_name, tags=t.tags)
            else:
                mlflow.update_run(run.info.run_id, status="RUNNING")
            opened = cls(mlflow, run.info.run_id)
            opened.log_params(t.params, dict(run.data.params))
            mlflow.set_tag(opened.run_id, STATUS_TAG, "running")
        except UserError:
            raise
        except Exception as e:
            raise unusable(t.uri, e) from e
        tracking.run_id = opened.run_id
        log.info("MLflow run %s (experiment %s) in %s", opened.run_id, t.experiment, t.uri)
        return opened

    def log_params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        """The config as params; a resumed run's changed settings (trainer.epochs) as tags
        ``resumed.KEY``: MLflow keeps a param's first value."""
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if logged.get(k, v) != v]
        if new or changed:
            self.mlflow.log_batch(self.run_id, params=new, tags=changed)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self._call(lambda: self.mlflow.log_batch(self.run_id, metrics=metrics))

    def finish(self, summary: dict[str, Any], ended: bool, files: list[Path]) -> None:
        """The run's ending: results (``ended``: not a stop to resume), status, files."""
        status = Status.of(summary)
        if ended:
            step = int(summary.get(SummaryKey.steps_done) or 0)
            self.scalars(step, final_metrics(summary))
        for path in files:
            if path.is_file():
                self._call(lambda p=path: self.mlflow.log_artifact(self.run_id, str(p)))
        self._call(lambda: self.mlflow.set_tag(self.run_id, STATUS_TAG, status.value))
        self.end(RUN_STATUS.get(status, "FAILED"))

    def end(self, status: str) -> None:
        if not self.ended:
            self.ended = True
            self._call(lambda: self.mlflow.set_terminated(self.run_id, status))

    def close(self) -> None:
        """A run left without a summary (a second signal, a crash): KILLED, not RUNNING."""
        self.end("KILLED")

    def _call(self, write: Any) -> None:
        if self.broken:
            return
        try:
            write()
        except Exception as e:
            self.broken = True
            log.warning(
                "MLflow stopped recording run %s (%s: %s); the run goes on, its metrics "
                "are in metrics.jsonl",
                self.run_id,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's finite results: the final and best errors and losses, the test set
    at the end (with a validation split), images/s, wall time."""
    return {
        k: float(v)
        for k, v in summary.items()
        if (k.startswith(("final_", "best_")) or k in FINAL_METRICS)
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


# --- a sweep's run ---------------------------------------------------------------------


def sweep_parent(sweep_dir: Path, uri: str) -> str | None:
    """The sweep's MLflow run id, as ``start_sweep`` wrote it for this ``uri``; else None."""
    try:
        saved = json.loads((sweep_dir / PARENT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("tracking_uri") != uri:
        return None
    run_id = saved.get("run_id")
    return run_id if isinstance(run_id, str) else None


def start_sweep(uri: str, experiment: str, sweep_dir: Path, tags: dict[str, str]) -> str:
    """The sweep's MLflow run: the one its folder names (a resumed sweep), else a new one,
    whose id is written into the folder for the jobs to find."""
    mlflow = client(uri)
    try:
        run = existing_run(mlflow, sweep_parent(sweep_dir, uri))
        if run is not None:
            mlflow.update_run(run.info.run_id, status="RUNNING")
        else:
            exp = experiment_id(mlflow, experiment, uri)
            name = str(sweep_dir)
            all_tags = {"sweep_dir": str(sweep_dir.resolve()), "host": socket.gethostname(), **tags}
            run = mlflow.create_run(exp, run_name=name, tags=all_tags)
        mlflow.set_tag(run.info.run_id, STATUS_TAG, "running")
    except UserError:
        raise
    except Exception as e:
        raise unusable(uri, e) from e
    run_id = run.info.run_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved = {"tracking_uri": uri, "experiment": experiment, "run_id": run_id}
    tmp = sweep_dir / f".{PARENT_FILE}.tmp"
    tmp.write_text(json.dumps(saved, indent=2) + "\n")
    os.replace(tmp, sweep_dir / PARENT_FILE)
    return run_id


def end_sweep(uri: str, sweep_dir: Path, status: Status) -> None:
    """The sweep's ending: its status, and its folder's report and figures as artifacts."""
    run_id = sweep_parent(sweep_dir, uri)
    if run_id is None:
        return
    mlflow = client(uri)
    for path in sorted(sweep_dir.iterdir()):
        if path.is_file() and path.suffix in SWEEP_ARTIFACTS:
            mlflow.log_artifact(run_id, str(path))
    mlflow.set_tag(run_id, STATUS_TAG, status.value)
    mlflow.set_terminated(run_id, RUN_STATUS.get(status, "FAILED"))
