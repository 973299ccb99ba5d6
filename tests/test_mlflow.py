"""logger=mlflow: each run in an MLflow store (the real package, a local SQLite file), read
back through MlflowClient: params, metrics by step, status, artifacts; a sweep as a parent
run with one child per job (basic and packed launchers, the search sweeper); a stopped and
resumed run as one MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from resnet_exp.config import flat_config
from resnet_exp.errors import UserError
from resnet_exp.report import CURVES_PNG, ERRORS_PNG, REPORT_CSV, REPORT_MD
from resnet_exp.run import tracking
from resnet_exp.run.records import read_metrics
from resnet_exp.run.tracking import PARENT_FILE, PARENT_TAG, check_tracking, resolve_uri

from conftest import (
    ONE_THREAD,
    TINY,
    compose_config,
    read_checkpoint,
    run_main,
    signal_after_first_evaluation,
    tb_scalars,
)

pytest.importorskip("mlflow", reason="pip install '.[mlflow]'")

# An epoch of 16 steps and 4 more: two evaluations (16, 20), train loss every 5 steps.
JOB = [*TINY, "trainer.log_every=5", "trainer.max_steps=20"]
MLFLOW = ["logger=mlflow"]
SWEEP = ["block=original,preact", "seed=${hydra:job.num}"]
PACKED = ["hydra/launcher=packed", "hydra.launcher.threads_per_run=1"]
CURVES = ("train/loss", "train/error", "lr", "test/loss", "test/error")


def store(db: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{db}")


def runs(db: Path, experiment: str = "resnet-exp") -> list[Any]:
    c = store(db)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=100) if exp else []


def history(db: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    points = store(db).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))]


def artifacts(db: Path, run_id: str) -> set[str]:
    return {a.path for a in store(db).list_artifacts(run_id)}


def assert_curves_match(db: Path, run_id: str, run_dir: Path) -> None:
    """The MLflow run's curves are the run's TensorBoard curves, step by step (each once)."""
    tb = tb_scalars(run_dir)
    for key in CURVES:
        got = history(db, run_id, key)
        assert [s for s, _ in got] == sorted(tb[key]), key
        assert [v for _, v in got] == pytest.approx([tb[key][s] for s, _ in got], rel=1e-6), key


def test_the_logger_group_adds_mlflow_beside_tensorboard(tmp_path: Path) -> None:
    default, both = compose_config([]), compose_config(MLFLOW)
    assert (default.logger.tensorboard, default.logger.mlflow) == (True, False)
    assert (both.logger.tensorboard, both.logger.mlflow) == (True, True)
    alone = compose_config([*MLFLOW, "logger.tensorboard=false"])
    assert (alone.logger.tensorboard, alone.logger.mlflow) == (False, True)
    # The default store: an SQLite file in mlruns/ where the command runs.
    assert (
        resolve_uri(both.mlflow.tracking_uri, tmp_path) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    )
    assert resolve_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"


def test_a_run_records_its_config_curves_result_and_files(
    tmp_path: Path, mlflow_store: Path
) -> None:
    run = tmp_path / "run"
    run_main([*JOB, *MLFLOW, f"hydra.run.dir={run}"], tmp_path)
    [r] = runs(mlflow_store)  # the default tracking_uri: ./mlruns/mlflow.db
    rid = r.info.run_id
    assert (r.info.run_name, r.info.status) == ("run", "FINISHED")
    assert r.data.tags["status"] == "completed" and r.data.tags["run_dir"] == str(run)
    assert PARENT_TAG not in r.data.tags
    # Params: the whole config as dotted keys, as its checkpoint keeps it.
    params = r.data.params
    assert params["depth"] == "8" and params["trainer.max_steps"] == "20"
    assert params["model.block"] == "preact" and params["data.name"] == "synthetic"
    flat = flat_config(compose_config([*JOB, *MLFLOW]))
    assert params == {k: str(v) for k, v in flat.items() if k not in tracking.NOT_PARAMS}
    assert "trust_checkpoint" in tracking.NOT_PARAMS and "resume" in tracking.NOT_PARAMS
    # Metrics by training step: the train loss every 5 steps, each evaluation.
    assert [s for s, _ in history(mlflow_store, rid, "train/loss")] == [5, 10, 15, 20]
    assert_curves_match(mlflow_store, rid, run)
    rows = read_metrics(run / "metrics.jsonl")
    assert history(mlflow_store, rid, "test/error") == [
        (row["step"], pytest.approx(row["test_error"])) for row in rows
    ]
    # The result: summary.json's results as metrics, not its description.
    summary = json.loads((run / "summary.json").read_text())
    for key in ("final_test_error", "best_test_error", "final_train_loss", "wall_time_s"):
        assert r.data.metrics[key] == pytest.approx(summary[key]), key
    assert "params" not in r.data.metrics and "depth" not in r.data.metrics
    # Files, beside the store; the run id in the checkpoint, a plain str.
    assert artifacts(mlflow_store, rid) == {"summary.json", "metrics.jsonl"}
    assert r.info.artifact_uri.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    saved = Path(store(mlflow_store).download_artifacts(rid, "summary.json", str(tmp_path)))
    assert json.loads(saved.read_text()) == summary
    assert read_checkpoint(run)["mlflow_run_id"] == rid


def test_mlflow_alone_and_tensorboard_alone(tmp_path: Path, mlflow_store: Path) -> None:
    alone = tmp_path / "alone"
    run_main([*JOB, *MLFLOW, "logger.tensorboard=false", f"hydra.run.dir={alone}"], tmp_path)
    assert not list(alone.glob("events.out.tfevents*"))
    assert (alone / "metrics.jsonl").exists() and (alone / "summary.json").exists()
    [r] = runs(mlflow_store)
    assert [s for s, _ in history(mlflow_store, r.info.run_id, "train/loss")] == [5, 10, 15, 20]
    run_main([*JOB, f"hydra.run.dir={tmp_path / 'tb'}"], tmp_path)  # the default: no MLflow
    assert len(runs(mlflow_store)) == 1 and list((tmp_path / "tb").glob("events.out.tfevents*"))
    assert read_checkpoint(tmp_path / "tb")["mlflow_run_id"] is None


def check_sweep(db: Path, sweep: Path) -> None:
    """One parent run for the sweep and a child per job, each with its own config and curves."""
    every = runs(db)
    parents = [r for r in every if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and len(every) == 3, [r.info.run_name for r in every]
    parent = parents[0]
    assert parent.data.tags["sweep_dir"] == str(sweep)
    assert (parent.info.status, parent.data.tags["status"]) == ("FINISHED", "completed")
    assert json.loads((sweep / PARENT_FILE).read_text())["run_id"] == parent.info.run_id
    report = {REPORT_MD, REPORT_CSV, CURVES_PNG, ERRORS_PNG}
    assert report <= artifacts(db, parent.info.run_id)
    children = sorted((r for r in every if r is not parent), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == ["0_original_8", "1_preact_8"]
    for child, block, seed in zip(children, ("original", "preact"), ("0", "1")):
        assert child.data.tags[PARENT_TAG] == parent.info.run_id
        assert (child.data.params["model.block"], child.data.params["seed"]) == (block, seed)
        assert child.info.status == "FINISHED" and child.data.tags["job"] == seed
        assert_curves_match(db, child.info.run_id, sweep / child.info.run_name)
        summary = json.loads((sweep / child.info.run_name / "summary.json").read_text())
        assert child.data.metrics["final_test_error"] == pytest.approx(summary["final_test_error"])


def test_a_sweep_is_a_parent_run_with_a_child_per_job(tmp_path: Path, mlflow_store: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *SWEEP, *JOB, *MLFLOW, f"hydra.sweep.dir={sweep}"]
    run_main(args, tmp_path)
    check_sweep(mlflow_store, sweep)
    run_main([*args, "resume=auto"], tmp_path)  # resumed: the same parent, no new child
    check_sweep(mlflow_store, sweep)


def test_packed_runs_are_children_of_their_sweep(tmp_path: Path, mlflow_store: Path) -> None:
    """Two runs in threads of one process, each writing its own MLflow run by id."""
    sweep = tmp_path / "packed"
    packed = [*PACKED, "hydra.launcher.runs_per_device=2"]
    run_main(["-m", *SWEEP, *JOB, *MLFLOW, *packed, f"hydra.sweep.dir={sweep}"], tmp_path)
    check_sweep(mlflow_store, sweep)


def test_a_diverged_job_fails_its_run_and_its_sweep(tmp_path: Path, mlflow_store: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "optimizer.lr=0.1,1e30", *JOB, *MLFLOW, f"hydra.sweep.dir={sweep}"]
    assert run_main(args, tmp_path, check=False).returncode == 1  # a sweep with a failed job
    every = {r.info.run_name: r for r in runs(mlflow_store)}
    ok, diverged, parent = every["0_preact_8"], every["1_preact_8"], every[str(sweep)]
    assert (ok.info.status, ok.data.tags["status"]) == ("FINISHED", "completed")
    assert (diverged.info.status, diverged.data.tags["status"]) == ("FAILED", "diverged")
    summary = json.loads((sweep / "1_preact_8" / "summary.json").read_text())
    assert diverged.data.metrics["diverged_at_step"] == summary["diverged_at_step"]
    assert (parent.info.status, parent.data.tags["status"]) == ("FAILED", "failed")


@pytest.mark.slow  # a search: Optuna's study, two trials (~15 s on 2 busy cores)
def test_a_search_is_a_parent_run_with_a_child_per_trial(
    tmp_path: Path, mlflow_store: Path
) -> None:
    pytest.importorskip("optuna", reason="pip install '.[optuna]'")
    sweep = tmp_path / "search"
    search = ["hydra/sweeper=search", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0"]
    data = ["data.synthetic_train=128", "data.val_size=32", "trainer.max_steps=8"]
    run_main(["-m", *search, *TINY, *data, *MLFLOW, f"hydra.sweep.dir={sweep}"], tmp_path)
    every = runs(mlflow_store)
    [parent] = [r for r in every if PARENT_TAG not in r.data.tags]
    assert parent.data.tags["sweeper"] == "search" and parent.info.status == "FINISHED"
    assert {"search.png", "optimization_results.yaml"} <= artifacts(
        mlflow_store, parent.info.run_id
    )
    trials = sorted((r for r in every if r is not parent), key=lambda r: r.info.run_name)
    assert [t.info.run_name for t in trials] == ["0_preact_8", "1_preact_8"]
    lrs = set()
    for trial in trials:
        assert trial.data.tags[PARENT_TAG] == parent.info.run_id
        summary = json.loads((sweep / trial.info.run_name / "summary.json").read_text())
        assert trial.data.metrics["final_val_error"] == pytest.approx(summary["final_val_error"])
        rows = read_metrics(sweep / trial.info.run_name / "metrics.jsonl")
        assert history(mlflow_store, trial.info.run_id, "val/error") == [
            (row["step"], pytest.approx(row["val_error"])) for row in rows
        ]
        assert len(rows) == 2  # 6 steps an epoch, 8 steps: two evaluations
        lrs.add(trial.data.params["optimizer.lr"])
    assert len(lrs) == 2  # each trial's own sampled settings


def test_sigterm_then_resume_auto_is_one_mlflow_run(tmp_path: Path, mlflow_store: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "trainer.log_every=5", "trainer.epochs=4", *MLFLOW, f"hydra.run.dir={run}"]
    rc, text = signal_after_first_evaluation(
        args, tmp_path, [run / "metrics.jsonl"], signal.SIGTERM
    )
    assert rc == 128 + signal.SIGTERM, text
    stopped = json.loads((run / "summary.json").read_text())["steps_done"]
    [r] = runs(mlflow_store)
    assert (r.info.status, r.data.tags["status"]) == ("KILLED", "interrupted")
    assert 16 <= stopped < 64

    run_main([*args, "resume=auto"], tmp_path)
    [resumed] = runs(mlflow_store)  # the same run, continued
    rid = resumed.info.run_id
    assert rid == r.info.run_id
    assert (resumed.info.status, resumed.data.tags["status"]) == ("FINISHED", "completed")
    # Contiguous: every point once, as an uninterrupted run logs them (64 steps, 4 epochs).
    assert [s for s, _ in history(mlflow_store, rid, "train/loss")] == [*range(5, 64, 5), 64]
    assert [s for s, _ in history(mlflow_store, rid, "test/error")] == [16, 32, 48, 64]
    assert_curves_match(mlflow_store, rid, run)
    assert not any(k.startswith("resumed.") for k in resumed.data.tags)  # same settings
    assert json.loads((run / "summary.json").read_text())["parts"] == 2
    assert read_checkpoint(run)["mlflow_run_id"] == rid


def test_a_longer_resumed_run_keeps_its_params_and_tags_the_change(
    tmp_path: Path, mlflow_store: Path
) -> None:
    run = tmp_path / "run"
    run_main([*JOB, *MLFLOW, f"hydra.run.dir={run}"], tmp_path)
    run_main([f"resume={run}", "trainer.max_steps=25"], tmp_path)  # inherits logger=mlflow
    [r] = runs(mlflow_store)
    assert r.data.params["trainer.max_steps"] == "20"  # MLflow keeps a param's first value
    assert r.data.tags["resumed.trainer.max_steps"] == "25"
    assert [s for s, _ in history(mlflow_store, r.info.run_id, "train/loss")] == [5, 10, 15, 20, 25]


# --- bad inputs: one line, exit 2, nothing written ---------------------------------------


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
@pytest.mark.parametrize(
    "case, args, says",
    [
        ("no experiment", ["mlflow.experiment=''"], "mlflow.experiment='' is empty"),
        (
            "unusable store",
            ["mlflow.tracking_uri=sqlite:////proc/resnet-exp/mlflow.db"],
            "mlflow.tracking_uri='sqlite:////proc/resnet-exp/mlflow.db' cannot be used",
        ),
    ],
)
def test_bad_mlflow_settings_one_line_exit_2_nothing_written(
    tmp_path: Path, case: str, args: list[str], says: str, sweep: bool
) -> None:
    out = tmp_path / "out"
    where = ["-m", f"hydra.sweep.dir={out}"] if sweep else [f"hydra.run.dir={out}"]
    r = run_main([*where, *JOB, *MLFLOW, *args], tmp_path, check=False)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_a_deleted_experiment_is_refused_before_the_run_writes(
    tmp_path: Path, mlflow_store: Path
) -> None:
    c = store(mlflow_store)
    c.delete_experiment(c.create_experiment("gone"))
    out = tmp_path / "out"
    r = run_main(
        [*JOB, *MLFLOW, "mlflow.experiment=gone", f"hydra.run.dir={out}"], tmp_path, check=False
    )
    assert r.returncode == 2 and "mlflow.experiment='gone' is deleted" in r.stderr, r.stderr
    assert not out.exists()


def test_without_the_package_logger_mlflow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'resnet-exp\[mlflow\]'"):
        check_tracking(compose_config(MLFLOW))
    check_tracking(compose_config([]))  # the default logger needs no MLflow
    for where in (
        [f"hydra.run.dir={tmp_path / 'run'}"],
        ["-m", f"hydra.sweep.dir={tmp_path / 's'}"],
    ):
        r = run_main([*where, *JOB, *MLFLOW], tmp_path, check=False)
        assert r.returncode == 2 and "resnet-exp[mlflow]" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


# --- nothing loaded, nothing sent, unless asked ---------------------------------------------


@pytest.mark.slow  # a command in a new process (torch, then mlflow imported): ~20 s on 2 busy cores
def test_mlflow_is_imported_only_for_logger_mlflow_and_sends_no_telemetry(
    tmp_path: Path, mlflow_store: Path
) -> None:
    """A run with the default logger never imports mlflow (seconds); with logger=mlflow,
    MLflow's usage telemetry stays off (nothing leaves but to the tracking URI)."""
    script = (
        "import sys\n"
        "from resnet_exp import cli\n"
        "from resnet_exp.run.tracking import client\n"
        "sys.argv = ['resnet-exp', *sys.argv[1:]]\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('mlflow' in sys.modules)\n"
        f"client('sqlite:///{mlflow_store}')  # as a run with logger=mlflow opens its store\n"
        "from mlflow.telemetry import get_telemetry_client\n"
        "print(get_telemetry_client())\n"
    )
    # MLflow turns its telemetry off by itself under pytest and CI: not in this process.
    quiet = ("PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
    env = {k: v for k, v in os.environ.items() if k not in quiet} | ONE_THREAD
    run = [*JOB, "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "-c", script, *run],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["False", "None"], proc.stdout
