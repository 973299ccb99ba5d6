"""Hyper-parameter search: Hydra's Optuna sweeper (hydra/sweeper=search) on tiny synthetic runs."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_exp.train.result import RunResult

from conftest import ONE_THREAD, TINY, run_cli

# 4 steps a trial, evaluated on 32 held-out training images.
JOB = [*TINY, "data.synthetic_train=128", "trainer.max_steps=4", "data.val_size=32"]
LR, WD = (0.01, 0.5), (1e-5, 1e-3)  # configs/hydra/sweeper/search.yaml's ranges


def needs_optuna() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install '.[optuna]'")


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    needs_optuna()
    tmp = tmp_path_factory.mktemp("search")
    sweep = tmp / "multirun"
    proc = run_cli(
        [
            "-m",
            "hydra/sweeper=search",
            "hydra.sweeper.n_trials=3",
            *JOB,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp,
        env=ONE_THREAD,
    )
    return sweep, proc.stdout


def trials(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


def test_search_minimises_the_validation_error(search) -> None:
    sweep, _ = search
    runs = trials(sweep)
    assert [p.name for p in runs] == ["0_preact_8", "1_preact_8", "2_preact_8"]
    found = {}
    for run in runs:
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        lr, wd = cfg.optimizer.lr, cfg.optimizer.weight_decay
        assert LR[0] <= lr <= LR[1] and WD[0] <= wd <= WD[1]  # sampled from the config's space
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed"
        found[(lr, wd)] = summary["final_val_error"]
    assert len(found) == 3  # three different trials
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    best = (result.best_params["optimizer.lr"], result.best_params["optimizer.weight_decay"])
    # Optuna got each trial's final validation error, and picked the lowest.
    assert result.best_value == min(found.values()) == found[best]


def test_report_and_tensorboard_list_the_trials(search) -> None:
    sweep, stdout = search
    assert f"report in {sweep / 'report.md'}" in stdout  # the callback ran after the search
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3  # one configuration per trial, named by what it searched
    for row, run in zip(rows, trials(sweep)):
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert f"optimizer.lr={cfg.optimizer.lr}" in row["configuration"]
        assert row["completed"] == "1"
        acc = EventAccumulator(str(run))
        acc.Reload()
        assert "hparams/final_val_error" in acc.Tags()["scalars"]  # TensorBoard's HPARAMS tab


def test_search_on_the_test_set_is_refused(tmp_path: Path) -> None:
    needs_optuna()
    sweep = tmp_path / "multirun"
    proc = run_cli(
        ["-m", "hydra/sweeper=search", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("resnet-exp: error: ") and proc.stderr.count("\n") == 1
    assert "data.val_size=0" in proc.stderr
    assert not sweep.exists()


def test_run_result_holds_the_summary_and_the_objective() -> None:
    done = RunResult.from_summary(
        dict(status="completed", final_val_error=12.5, final_test_error=11.0)
    )
    assert float(done) == 12.5  # the validation error, never the test error
    assert pickle.loads(pickle.dumps(done)) == done  # launchers in other processes
    assert float(RunResult.from_summary(dict(status="diverged", diverged_at_step=3))) == 100.0
    with pytest.raises(ValueError, match="data.val_size=0"):
        float(RunResult.from_summary(dict(status="completed", final_test_error=11.0)))
    with pytest.raises(ValueError, match="failed"):
        float(RunResult.from_summary(dict(status="failed", error="UserError: bad lr")))
