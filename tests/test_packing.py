"""Packed runs (hydra/launcher=packed): several runs in one process, each as if alone."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from resnet_exp.run.records import read_metrics
from resnet_exp.sweep import pack
from resnet_exp.train.loop import train

from conftest import (
    TINY,
    Result,
    assert_same_tensors,
    compose_config,
    outcome,
    read_checkpoint,
    read_summary,
    run_installed,
    run_main,
    signal_after_first_evaluation,
    without_wall_clock,
)

# Tiny runs crossing an epoch end (16 steps): evaluation, checkpoint, logs.
SHORT = [*TINY, "trainer.log_every=5", "trainer.max_steps=20"]
JOB = [*SHORT, "trainer.deterministic=true"]
# Two runs differing in ordering and seed (the job number): 0_original_8, 1_preact_8.
SWEEP = ["block=original,preact", "seed=${hydra:job.num}"]
PACKED = ["hydra/launcher=packed", "hydra.launcher.threads_per_run=1"]
# The checkpoint's RNG snapshot is the process's (Python's, NumPy's, torch's default
# generators), which packed runs share; each run draws its data order and its
# augmentation from generators of its own, which its weights and loader state show.
SHARED = ("rng",)


def sweep(tmp_path: Path, name: str, args: list[str], check: bool = True) -> Result:
    """A sweep through the command's entry function, in this process."""
    return run_main(["-m", *args, f"hydra.sweep.dir={tmp_path / name}"], tmp_path, check=check)


def files(run: Path) -> list[str]:
    """A run directory's files; the TensorBoard file's name holds a time and a pid."""
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    return sorted("events.out.tfevents" if n.startswith("events.out") else n for n in names)


@pytest.fixture(scope="module")
def basic_and_packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The same two-run sweep through Hydra's basic launcher and packed, both at once."""
    tmp = tmp_path_factory.mktemp("sweeps")
    sweep(tmp, "basic", [*SWEEP, *JOB])
    packed = sweep(tmp, "packed", [*SWEEP, *JOB, *PACKED, "hydra.launcher.runs_per_device=2"])
    return tmp / "basic", tmp / "packed", packed.stdout + packed.stderr


def test_packed_sweep_writes_what_the_basic_launcher_writes(
    basic_and_packed: tuple[Path, Path, str],
) -> None:
    basic, packed, output = basic_and_packed
    assert "Packing 2 jobs, 2 at a time on cpu, 1 thread(s) each" in output
    names = ["0_original_8", "1_preact_8"]
    assert sorted(p.name for p in packed.iterdir() if p.is_dir()) == names
    for f in ("report.md", "report.csv", "multirun.yaml"):  # the sweep's callbacks ran
        assert (packed / f).exists(), f
    for name, block, seed in zip(names, ("original", "preact"), (0, 1)):
        assert files(packed / name) == files(basic / name)
        for f in ("config.yaml", "overrides.yaml"):
            assert (packed / name / ".hydra" / f).read_text() == (
                basic / name / ".hydra" / f
            ).read_text()
        summary = read_summary(packed / name)
        assert (summary["block"], summary["seed"], summary["status"]) == (block, seed, "completed")
        # Its log holds its own lines only: one header, one line per evaluation.
        own = (packed / name / "resnet-exp.log").read_text().splitlines()
        words = [ln.split(" - ", 1)[1].split(" ", 1)[0] for ln in own]
        if words[0] == "trainer.precision=auto:":  # the CPU's precision choice, then the header
            words = words[1:]
        assert words == [block, "epoch", "epoch"]
        # The checkpoint remembers its own overrides (for resume=DIR), not the other run's.
        assert f"block={block}" in read_checkpoint(packed / name)["overrides"]


def test_packed_runs_are_bit_identical_to_runs_alone(
    basic_and_packed: tuple[Path, Path, str],
) -> None:
    """CPU, trainer.deterministic=true: two runs trained at once in one process end
    with the weights, optimizer, data position, metrics and curves of each run alone."""
    basic, packed, _ = basic_and_packed
    for name in ("0_original_8", "1_preact_8"):
        assert_same_tensors(outcome(packed / name, SHARED), outcome(basic / name, SHARED), name)
    a, b = (read_checkpoint(packed / n)["model"] for n in ("0_original_8", "1_preact_8"))
    assert not torch.equal(
        a["stem.0.weight"], b["stem.0.weight"]
    )  # different seeds, different inits


def test_failing_and_diverging_runs_stop_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four runs at once: one completes, one hits an internal error (an injected fault),
    one a bad value, one diverges; the others are unaffected; the sweep reports them."""
    from resnet_exp import cli

    real = cli.run

    def run(cfg: Any, ctx: Any) -> Any:
        if cfg.optimizer.lr == 0.2:
            raise RuntimeError("injected fault")
        return real(cfg, ctx)

    monkeypatch.setattr(cli, "run", run)
    args = ["optimizer.lr=0.1,0.2,-1,1e30", *JOB, *PACKED, "hydra.launcher.runs_per_device=4"]
    proc = sweep(tmp_path, "s", args, check=False)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "resnet-exp: 3 of 4 jobs failed: 1_preact_8 (failed), 2_preact_8 (failed), 3_preact_8 (diverged)"
    ), last
    status = {d.name: read_summary(d) for d in sorted((tmp_path / "s").glob("*_preact_8"))}
    assert (
        status["0_preact_8"]["status"] == "completed" and status["0_preact_8"]["steps_done"] == 20
    )
    assert status["1_preact_8"] == {"status": "failed", "error": "RuntimeError: injected fault"}
    assert status["2_preact_8"]["error"] == "optimizer.lr=-1.0 must be a positive number"
    assert status["3_preact_8"]["status"] == "diverged"
    # A run's log file opens at its first line: the bad value's run logged none.
    files = {name: tmp_path / "s" / name / "resnet-exp.log" for name in status}
    logs = {name: f.read_text() for name, f in files.items() if f.exists()}
    assert set(logs) >= {"0_preact_8", "1_preact_8", "3_preact_8"}
    assert "Traceback" in logs["1_preact_8"]  # the fault's traceback, in its own log only
    assert all("Traceback" not in text for name, text in logs.items() if name != "1_preact_8")
    assert "Traceback" not in proc.stderr


def test_packing_refuses_jobs_with_different_process_settings(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "s", [*SHORT, "trainer.deterministic=true,false", *PACKED], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "resnet-exp: error: trainer.deterministic differs between jobs 0_preact_8 (True) and "
        "1_preact_8 (False); it is one setting per process: pack such jobs in separate sweeps"
    )
    assert not list(tmp_path.rglob("*_preact_8"))


@pytest.mark.slow  # two commands and real training: ~15 s on an idle 2-core CPU
def test_sigterm_checkpoints_every_packed_run_then_the_sweep_resumes(tmp_path: Path) -> None:
    long = [*TINY, "trainer.epochs=50", "seed=1,2", *PACKED, "hydra.launcher.runs_per_device=2"]
    sweep_dir = tmp_path / "s"
    rc, text = signal_after_first_evaluation(  # both runs are past their first epoch
        ["-m", *long, f"hydra.sweep.dir={sweep_dir}"],
        tmp_path,
        [sweep_dir / f"{i}_preact_8" / "metrics.jsonl" for i in (0, 1)],
        signal.SIGTERM,
    )
    assert rc == 128 + signal.SIGTERM, text
    assert "Traceback" not in text
    assert text.count("SIGTERM received") == 1
    for i in (0, 1):
        run = sweep_dir / f"{i}_preact_8"
        summary = read_summary(run)
        assert summary["status"] == "interrupted", summary
        step = summary["steps_done"]
        assert 16 <= step < 64
        assert f"stopped by SIGTERM after step {step}; checkpoint: {run / 'last.pt'}" in text
        assert read_checkpoint(run)["step"] == step

    # The same command with resume=auto continues both runs from their checkpoints.
    shorter = [a for a in long if a != "trainer.epochs=50"] + ["trainer.max_steps=64"]
    run_main(["-m", *shorter, "resume=auto", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    for i in (0, 1):
        log = (sweep_dir / f"{i}_preact_8" / "resnet-exp.log").read_text()
        assert "resumed from" in log


# --- the mechanism in-process: the loop's own entry on threads ------------------


def train_packed(device: str, cfgs: dict[str, Any], root: Path) -> None:
    """Train the runs at once, one thread each, as the packed launcher does."""
    gate = pack.SetupGate()
    errors: list[BaseException] = []

    def one(name: str, cfg: Any) -> None:
        stop = pack.PackedStop()
        try:
            with pack.packed_run(gate, stop, torch.device(device), threads=1):
                (root / name).mkdir(parents=True)
                train(cfg, root / name, stop)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=item) for item in cfgs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_threads_train_each_run_as_alone(device: str, tmp_path: Path) -> None:
    """Three runs (seeds, orderings, depths differ) on three threads against each alone:
    bit-identical on the CPU; on a GPU, where each has its own CUDA stream and CUDA
    graph (fp32, cuDNN deterministic), equal within cuDNN's tolerance."""
    base = [o for o in JOB if not o.startswith("trainer.device")]
    base += [f"trainer.device={device}", "trainer.precision=fp32"]
    runs = {
        "a": [*base, "seed=1", "block=original"],
        "b": [*base, "seed=2", "block=preact"],
        "c": [*base, "seed=3", "block=relu_before_add", "depth=14"],
    }
    cfgs = {name: compose_config(o) for name, o in runs.items()}  # Hydra's compose: not thread-safe
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in runs:
            (tmp_path / "alone" / name).mkdir(parents=True)
            train(compose_config(runs[name]), tmp_path / "alone" / name, None)
        train_packed(device, cfgs, tmp_path / "packed")
    finally:
        torch.set_num_threads(before)
    for name in runs:
        alone, packed = (tmp_path / k / name for k in ("alone", "packed"))
        if device == "cpu":
            assert_same_tensors(outcome(packed, SHARED), outcome(alone, SHARED), name)
            continue
        a, b = (read_checkpoint(d) for d in (alone, packed))
        assert b["step"] == a["step"] == 20
        for key, value in a["model"].items():
            torch.testing.assert_close(
                b["model"][key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key
            )
        rows = [read_metrics(d / "metrics.jsonl")[-1] for d in (alone, packed)]
        assert rows[1]["train_loss"] == pytest.approx(rows[0]["train_loss"], rel=1e-4)


@pytest.mark.slow  # builds and installs a wheel
def test_wheel_carries_the_packed_launcher(installed_wheel: Path, tmp_path: Path) -> None:
    """Hydra finds launchers in the hydra_plugins namespace package: the wheel ships it."""
    site = installed_wheel
    assert not (site / "hydra_plugins" / "__init__.py").exists()  # a namespace package
    code = (
        "import sys; from resnet_exp import cli; sys.argv[1:] = ['hydra/launcher=packed', "
        "'hydra.launcher.runs_per_device=3', '--cfg', 'hydra', '-p', 'hydra.launcher']; cli.main()"
    )
    proc = run_installed(site, code, cwd=tmp_path)
    assert (site / "hydra_plugins" / "resnet_exp_packed" / "packed_launcher.py").exists()
    assert "hydra_plugins.resnet_exp_packed.packed_launcher.PackedLauncher" in proc.stdout
    assert "runs_per_device: 3" in proc.stdout


def test_packed_sweep_report_holds_what_the_basic_launchers_holds(
    basic_and_packed: tuple[Path, Path, str],
) -> None:
    """The sweep's report.csv: one row per run, each with its errors, equal to the
    basic launcher's (the runs are bit-identical) but for the wall-clock columns."""
    import csv

    basic, packed, _ = basic_and_packed

    def rows(sweep_dir: Path) -> list[dict[str, str]]:
        with open(sweep_dir / "report.csv", newline="") as f:
            return [without_wall_clock(r) for r in csv.DictReader(f)]

    got = rows(packed)
    assert [(r["block"], r["completed"], r["seeds"]) for r in got] == [
        ("original", "1", "0"),
        ("preact", "1", "1"),
    ]
    assert all(0 <= float(r["median_error"]) <= 100 for r in got)
    assert got == rows(basic)
    assert "original" in (packed / "report.md").read_text()
