"""A dry run means one thing under every launcher and the search: each job is built,
what it would run is printed, and it counts as done; a search's dry run asks the study
for no trial and writes no study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from resnet_exp.callbacks import Reporter
from resnet_exp.sweep.search.study import JOURNAL

from conftest import ONE_THREAD, TINY, run_cli, run_main


def sweep_config(sweep: Path, dry_run: bool, launcher: str = "basic", n_jobs: int = 2):
    """What the Reporter reads of a sweep's config."""
    return OmegaConf.create(
        {
            "dry_run": dry_run,
            "data": {"name": "synthetic", "root": "data", "download": False},
            "hydra": {
                "sweep": {"dir": str(sweep)},
                "runtime": {"choices": {"hydra/launcher": launcher}},
                "launcher": {"n_jobs": n_jobs},
            },
        }
    )


def test_a_dry_run_sweep_counts_its_jobs_as_built(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = run_main(
        ["-m", *TINY, "block=original,preact", "dry_run=true", f"hydra.sweep.dir={sweep}"], tmp_path
    )
    assert r.returncode == 0 and r.stdout.count('"params"') == 2  # each job printed
    assert "all 2 jobs built (dry run: nothing trained)" in r.stdout + r.stderr
    assert not list(sweep.glob("*/summary.json")) and not list(sweep.glob("*/last.pt"))


def test_jobs_run_in_other_processes_are_read_from_their_directories(tmp_path: Path) -> None:
    """The joblib launcher (hydra/launcher=gpus) runs jobs in worker processes: the
    Reporter sees only their directories. A dry run leaves no summary.json (a completed
    one would let resume=auto skip the job), so there, no summary means built; in a real
    sweep it means killed; a failed dry-run job's summary says failed."""
    sweep = tmp_path / "sweep"
    for name in ("0_original_8", "1_preact_8"):
        (sweep / name / ".hydra").mkdir(parents=True)
    Reporter().on_multirun_end(sweep_config(sweep, dry_run=True))  # no exit: all built
    with pytest.raises(SystemExit) as e:
        Reporter().on_multirun_end(sweep_config(sweep, dry_run=False))
    assert e.value.code == 1
    (sweep / "1_preact_8" / "summary.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(SystemExit) as e:
        Reporter().on_multirun_end(sweep_config(sweep, dry_run=True))
    assert e.value.code == 1


def test_gpus_launcher_says_when_there_is_no_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for available, launcher in [(False, "gpus"), (True, "gpus"), (False, "basic")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        Reporter().on_multirun_start(sweep_config(tmp_path / "s", False, launcher, n_jobs=4))
        said = capsys.readouterr().err
        expected = "hydra/launcher=gpus, but this machine has no CUDA GPU: the jobs run on the CPU, 4 at once"
        assert (expected in said) == (launcher == "gpus" and not available), (available, launcher)


def test_a_search_dry_run_builds_one_job_and_writes_no_study(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="pip install '.[optuna]'")
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/sweeper=search", "hydra.sweeper.n_trials=5", *TINY]
    args += ["data.val_size=32", "optimizer.lr=tag(log, interval(1e-3, 1e-1))"]
    r = run_main([*args, "dry_run=true", f"hydra.sweep.dir={sweep}"], tmp_path)
    out = r.stdout + r.stderr
    assert "search (dry run): would ask 5 trials of study 'search'" in out
    assert "optimizer.lr=0.001" in out  # the range's lower end
    assert "every trial" not in out and "failed" not in out
    assert [p.name for p in sweep.iterdir()] == ["0_preact_8"]  # one job, no study.journal
    assert not (sweep / JOURNAL).exists()
    assert r.stdout.count('"params"') == 1


def test_a_search_dry_run_of_a_job_that_cannot_be_built_fails(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="pip install '.[optuna]'")
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/sweeper=search", *TINY, "data.val_size=5000", "dry_run=true"]
    r = run_main([*args, f"hydra.sweep.dir={sweep}"], tmp_path, check=False)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet-exp: error: the search's dry run failed: data.val_size=5000")
    assert not (sweep / JOURNAL).exists()


def test_a_search_dry_run_on_the_test_set_is_refused_as_the_search_would_be(
    tmp_path: Path,
) -> None:
    """A dry run means what the run means: a search without a validation split is
    refused in its dry run too, before anything is written."""
    pytest.importorskip("optuna", reason="pip install '.[optuna]'")
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/sweeper=search", *TINY, "optimizer.lr=interval(0.01, 0.1)"]
    r = run_main([*args, "dry_run=true", f"hydra.sweep.dir={sweep}"], tmp_path, check=False)
    assert r.returncode == 2 and "data.val_size=0 holds out no validation images" in r.stderr
    assert not sweep.exists()


def test_a_sweep_cannot_also_print_its_config_but_says_so_in_one_line(tmp_path: Path) -> None:
    r = run_main(["-m", "block=original,preact", "--cfg", "job"], tmp_path, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "resnet-exp: error: --multirun and --cfg cannot go together: give one of --run, "
        "--multirun, --cfg, --info, --shell-completion (--cfg job without -m prints one "
        "job's config)"
    ]


@pytest.mark.slow  # worker processes import torch: ~30 s on 2 cores
def test_gpus_launcher_dry_run_on_a_cpu_completes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=gpus", "hydra.launcher.n_jobs=2", *TINY]
    proc = run_cli(
        [*args, "block=original,preact", "dry_run=true", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        env=ONE_THREAD,
    )
    out = proc.stdout + proc.stderr
    assert "all 2 jobs built (dry run: nothing trained)" in out and "failed" not in out
    if not torch.cuda.is_available():
        assert "this machine has no CUDA GPU" in proc.stderr
