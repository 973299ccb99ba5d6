"""Hyper-parameter search (hydra/sweeper=search) on tiny synthetic runs: the study, its
storage and continuation, pruning, several sweeps on one study, and the bad inputs."""

from __future__ import annotations

import csv
import json
import pickle
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from resnet_exp.run.records import read_metrics
from resnet_exp.run.result import RunResult
from resnet_exp.sweep.search.space import parse_space, readable
from resnet_exp.sweep.search.study import JOURNAL

from conftest import (
    TINY,
    Forked,
    compose_config,
    read_summary,
    run_main,
    start_command,
    tb_scalars,
)

optuna = pytest.importorskip("optuna", reason="pip install '.[optuna]'")

# 4 steps a trial, evaluated on 32 held-out training images.
JOB = [*TINY, "data.synthetic_train=128", "trainer.max_steps=4", "data.val_size=32"]
LR, WD = (0.01, 0.5), (1e-5, 1e-3)  # configs/hydra/sweeper/search.yaml's ranges
# Three epochs of 30 steps on learnable synthetic images: a good learning rate gets
# the validation error well below chance by epoch 2, 1e-6 does not move it.
EPOCHS = [
    *TINY,
    "data.synthetic_train=1024",
    "data.val_size=128",
    "data.batch_size=32",
    "trainer.epochs=3",
]


def load_study(storage: Path, name: str = "search"):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(
        study_name=name, storage=JournalStorage(JournalFileBackend(str(storage)))
    )


def trials(sweep: Path) -> list[Path]:
    return sorted(
        (p for p in sweep.iterdir() if (p / ".hydra").is_dir()),
        key=lambda p: int(p.name.split("_")[0]),
    )


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("search")
    sweep = tmp / "multirun"
    proc = run_main(
        [
            "-m",
            "hydra/sweeper=search",
            "hydra.sweeper.n_trials=3",
            *JOB,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp,
    )
    return sweep, proc.stdout


def test_search_minimises_the_validation_error(search) -> None:
    sweep, _ = search
    runs = trials(sweep)
    assert [p.name for p in runs] == ["0_preact_8", "1_preact_8", "2_preact_8"]
    found = {}
    for run in runs:
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        lr, wd = cfg.optimizer.lr, cfg.optimizer.weight_decay
        assert LR[0] <= lr <= LR[1] and WD[0] <= wd <= WD[1]  # sampled from the config's space
        s = read_summary(run)
        assert s["status"] == "completed"
        found[(lr, wd)] = s["final_val_error"]
    assert len(found) == 3  # three different trials
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    best = (result.best_params["optimizer.lr"], result.best_params["optimizer.weight_decay"])
    # Optuna got each trial's final validation error, and picked the lowest.
    assert result.best_value == min(found.values()) == found[best]
    # The study is stored in the sweep folder: trial N is job N, with the values it trained.
    study = load_study(sweep / JOURNAL)
    assert [t.number for t in study.trials] == [0, 1, 2]
    for t, run in zip(study.trials, runs):
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert t.params == {
            "optimizer.lr": cfg.optimizer.lr,
            "optimizer.weight_decay": cfg.optimizer.weight_decay,
        }
        assert t.value == read_summary(run)["final_val_error"]
    assert (sweep / "search.png").stat().st_size > 10_000  # history and one panel per parameter


def test_report_and_tensorboard_list_the_trials(search) -> None:
    sweep, stdout = search
    assert f"report in {sweep / 'report.md'}" in stdout  # the callback ran after the search
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3  # one configuration per trial, named by what it searched
    for row, run in zip(rows, trials(sweep)):
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        # readable: 3 significant digits (0.0513), not the 17 digits trained
        assert row["configuration"] == (
            f"optimizer.lr={readable(cfg.optimizer.lr)}, "
            f"optimizer.weight_decay={readable(cfg.optimizer.weight_decay)}"
        )
        assert row["completed"] == "1"
        assert "hparams/final_val_error" in tb_scalars(run)  # TensorBoard's HPARAMS tab


def test_search_on_the_test_set_is_refused(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    proc = run_main(
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


def test_search_space_syntax() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = parse_space(
        {"optimizer.lr": "tag(log, interval(0.01, 0.5))", "depth": "20"},
        [
            "optimizer.lr=interval(0.1, 0.2)",
            "block=choice(preact,original)",
            "depth=range(8, 30, 6)",
        ],
    )
    d = space.distributions
    assert d["optimizer.lr"] == FloatDistribution(
        0.1, 0.2
    )  # the command line's range replaces the config's
    assert d["block"] == CategoricalDistribution(["preact", "original"])
    assert d["depth"] == IntDistribution(8, 26, step=6)  # Hydra's range: 30 excluded
    assert parse_space({"x": "tag(log, interval(1, 64))"}, []).distributions[
        "x"
    ] == FloatDistribution(1.0, 64.0, log=True)  # Hydra's interval is a float one
    assert space.overrides({"optimizer.lr": 0.15, "block": "preact", "depth": 14}) == [
        "optimizer.lr=0.15",
        "block=preact",
        "depth=14",
    ]
    assert readable(0.0123456) == "0.0123" and readable(1.5e-05) == "1.5e-05"


BAD = {
    "pruner": (
        ["hydra.sweeper.pruner=sometimes"],
        "hydra.sweeper.pruner='sometimes' is not one of none, median, halving, hyperband",
    ),
    "empty interval": (
        ["optimizer.lr=interval(0.5, 0.1)"],
        "optimizer.lr=interval(0.5, 0.1): the interval is empty",
    ),
    "log of zero": (["optimizer.lr=tag(log, interval(0, 0.1))"], "a log interval needs a > 0"),
    "key": (
        ["optimizer.lrate=interval(0.01, 0.1)"],
        "search-space key 'optimizer.lrate' is not in the config",
    ),
    "storage": (
        ["hydra.sweeper.storage=sqlite:////no/such/dir/study.db"],
        "hydra.sweeper.storage='sqlite:////no/such/dir/study.db' cannot be opened",
    ),
    "journal": (["hydra.sweeper.storage=/no/such/dir/study.journal"], "cannot be opened"),
    "sampler": (
        ["hydra.sweeper.sampler.name=best"],
        "hydra.sweeper.sampler.name='best' is not one of tpe, random, grid",
    ),
    "grid interval": (
        ["hydra.sweeper.sampler.name=grid"],
        "sampler.name=grid takes choice(...) and range(...)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_search_inputs_one_line_exit_2_nothing_written(tmp_path: Path, case: str) -> None:
    args, message = BAD[case]
    sweep = tmp_path / "multirun"
    r = run_main(
        ["-m", "hydra/sweeper=search", *JOB, f"hydra.sweep.dir={sweep}", *args],
        tmp_path,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("resnet-exp: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not sweep.exists()  # no study, no trial directory


def test_every_trial_failed_ends_the_search_naming_the_errors(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    # Every trial's job refuses its data split (more held out than there are images).
    r = run_main(
        [
            "-m",
            "hydra/sweeper=search",
            "hydra.sweeper.n_trials=2",
            *JOB,
            "data.val_size=5000",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        check=False,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet-exp: error: every trial of the search failed (2): trials 0, 1: ")
    assert "data.val_size=5000 must be in" in last
    assert not (sweep / "optimization_results.yaml").exists()


def test_an_existing_search_is_continued_only_when_asked(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    (sweep / JOURNAL).write_text("")
    r = run_main(
        ["-m", "hydra/sweeper=search", *JOB, f"hydra.sweep.dir={sweep}"], tmp_path, check=False
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"continue it with resume=auto hydra.sweep.dir={sweep}" in r.stderr
    assert (sweep / JOURNAL).read_text() == ""  # untouched


def test_pruning_stops_the_trial_a_bad_learning_rate_makes_worse(tmp_path: Path) -> None:
    """Two trials with a good learning rate, then one with 1e-6 on the same study:
    successive halving stops it at the first rung (epoch 2 of 3), as a stopped run:
    checkpoint, summary status pruned, exit 0; the report and HPARAMS show where."""
    sweep = tmp_path / "multirun"
    common = [
        "-m",
        "hydra/sweeper=search",
        *EPOCHS,
        "hydra.sweeper.min_resource=2",
        f"hydra.sweep.dir={sweep}",
    ]
    run_main([*common, "hydra.sweeper.n_trials=2", "optimizer.lr=interval(0.04, 0.06)"], tmp_path)
    r = run_main(
        [*common, "hydra.sweeper.n_trials=3", "optimizer.lr=interval(1e-6, 2e-6)", "resume=auto"],
        tmp_path,
    )
    assert r.returncode == 0
    bad = trials(sweep)[2]
    s = read_summary(bad)
    assert s["status"] == "pruned" and s["pruned_at_epoch"] == 2
    assert s["steps_done"] == 2 * s["steps_per_epoch"] < s["steps"]  # stopped before the end
    assert (bad / "last.pt").exists() and s["checkpoint"] == str(bad / "last.pt")
    study = load_study(sweep / JOURNAL)
    t = study.trials[2]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert sorted(t.intermediate_values) == [1, 2]  # each scheduled evaluation, by epoch
    assert t.intermediate_values[2] == s["final_val_error"]
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert tb_scalars(bad)["hparams/pruned_at_epoch"] == {s["steps_done"]: 2.0}
    report = (sweep / "report.md").read_text()
    assert f"| `{bad.name}` |" in report and "pruned by the search after epoch 2" in report


def test_the_trainer_stops_where_its_evaluation_reporter_says(tmp_path: Path) -> None:
    """The trainer knows only train/pruning.py's protocol (no study, no Hydra): it
    reports each scheduled evaluation and ends ``pruned`` after the one it is told to."""
    from resnet_exp.run.result import Status
    from resnet_exp.train.context import resolve
    from resnet_exp.train.loop import Trainer

    class StopAfterEpoch2:
        def __init__(self) -> None:
            self.seen: list[tuple[int, float]] = []

        def should_stop(self, epoch: int, val_error: float) -> bool:
            self.seen.append((epoch, val_error))
            return epoch == 2

    reporter = StopAfterEpoch2()
    cfg = compose_config([*TINY, "data.val_size=32", "trainer.epochs=4"])
    result = Trainer(cfg, resolve(cfg, tmp_path, pruning=reporter)).run()
    s = read_summary(tmp_path)
    assert result.status is Status.pruned and result.ok and result.exit_code == 0
    assert result.check() is result  # a Python caller gets the result, nothing raised
    assert [e for e, _ in reporter.seen] == [1, 2]  # asked after each evaluation, until told
    assert s["status"] == "pruned" and s["pruned_at_epoch"] == 2
    assert s["final_val_error"] == reporter.seen[-1][1] == result.summary["final_val_error"]
    assert s["steps_done"] == 2 * s["steps_per_epoch"] < s["steps"]
    assert s["checkpoint"] == str(tmp_path / "last.pt") and (tmp_path / "last.pt").exists()
    assert "test_error" not in s  # the test set is for runs trained to their end


def _wait_for(pred, proc: Forked, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, proc.result().stderr[-2000:]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_stored_search_interrupted_and_continued(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    args = [
        "-m",
        "hydra/sweeper=search",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.pruner=none",
        *EPOCHS,
        f"hydra.sweep.dir={sweep}",
    ]
    proc = start_command(args, tmp_path)

    def two_done() -> bool:
        done = [
            p
            for p in sweep.glob("*_preact_8/summary.json")
            if json.loads(p.read_text())["status"] == "completed"
        ]
        return len(done) >= 2

    _wait_for(two_done, proc)
    kept = {
        p.name: (p / "summary.json").read_bytes()
        for p in trials(sweep)
        if (p / "summary.json").exists()
    }
    proc.send_signal(signal.SIGTERM)
    done = proc.result(timeout=120)
    assert done.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), done.stderr
    assert len(load_study(sweep / JOURNAL).trials) < 4

    run_main([*args, "resume=auto"], tmp_path)
    study = load_study(sweep / JOURNAL)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]  # n_trials over the whole study
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    runs = trials(sweep)
    assert [p.name for p in runs] == [f"{n}_preact_8" for n in range(4)]
    for name, before in kept.items():  # the first trials kept as they were, not run again
        assert (sweep / name / "summary.json").read_bytes() == before
    for t, run in zip(study.trials, runs):
        assert t.value == read_summary(run)["final_val_error"]


@pytest.mark.slow
def test_two_sweeps_feed_one_study(tmp_path: Path) -> None:
    storage = tmp_path / "shared.journal"
    procs = [
        start_command(
            [
                "-m",
                "hydra/sweeper=search",
                "hydra.sweeper.n_trials=6",
                f"hydra.sweeper.storage={storage}",
                *JOB,
                f"hydra.sweep.dir={tmp_path / name}",
            ],
            tmp_path,
        )
        for name in ("a", "b")
    ]
    for p in procs:
        done = p.result(timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    study = load_study(storage)
    numbers = {t.number: t for t in study.trials}
    dirs = {int(p.name.split("_")[0]): p for name in ("a", "b") for p in trials(tmp_path / name)}
    assert set(dirs) == set(numbers)  # each trial of the one study is a job of one of the sweeps
    assert (
        6 <= len(numbers) <= 7
    )  # n_trials over the study (each sweep may ask one more at the end)
    assert trials(tmp_path / "a") and trials(tmp_path / "b")  # both fed it
    for n, run in dirs.items():
        assert numbers[n].state == optuna.trial.TrialState.COMPLETE
        assert numbers[n].value == read_summary(run)["final_val_error"]


@pytest.mark.slow
def test_packed_launcher_runs_trials_of_a_search_at_once(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    run_main(
        [
            "-m",
            "hydra/sweeper=search",
            "hydra/launcher=packed",
            "hydra.launcher.runs_per_device=2",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=2",
            *EPOCHS,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    spans = []
    for run in trials(sweep):
        rows = read_metrics(run / "metrics.jsonl")
        assert read_summary(run)["status"] in ("completed", "pruned")
        mtime = (run / "metrics.jsonl").stat().st_mtime
        spans.append((mtime - rows[-1]["time_s"], mtime))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1  # the two trials trained at the same time
    assert len(load_study(sweep / JOURNAL).trials) == 2


@pytest.mark.slow
def test_submitit_trials_prune_from_their_own_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials in other processes (submitit, hydra/launcher=local) reach the study through
    its storage: the sweep's results match their summaries, and pruning reaches them."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install '.[slurm]'")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trials' processes: one thread each
    sweep = tmp_path / "multirun"
    common = ["-m", "hydra/sweeper=search", "hydra/launcher=local", *EPOCHS]
    common += ["hydra.sweeper.min_resource=2", f"hydra.sweep.dir={sweep}"]
    run_main([*common, "hydra.sweeper.n_trials=1", "optimizer.lr=interval(0.04, 0.06)"], tmp_path)
    run_main(
        [*common, "hydra.sweeper.n_trials=2", "optimizer.lr=interval(1e-6, 2e-6)", "resume=auto"],
        tmp_path,
    )
    study = load_study(sweep / JOURNAL)
    assert [t.state for t in study.trials] == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    ]
    assert read_summary(trials(sweep)[1])["status"] == "pruned"
