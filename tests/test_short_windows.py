"""Short GPU windows: the time limit through the command and a packed sweep, gpu-check's
refusals and timeouts (its CPU dry mode and reproduce's run in test_offline.py's
rehearsal of a window; reproduce's failures in test_campaign.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import ONE_THREAD, REPO, TINY, console_script, import_script, read_checkpoint, run_cli

SCRIPTS = REPO / "scripts"


def console(name: str) -> str:
    """An installed command of the package, beside ``resnet-exp``."""
    return str(Path(console_script()).with_name(name))


# A run far longer than any window below: only its time limit ends it.
WORKER_TIMEOUT = "RESNET_EXP_WORKER_TIMEOUT"  # gpu-check's limit for each measurement
LONG = [*TINY, "trainer.max_steps=1000000", "trainer.log_every=8"]


def script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """A script of scripts/, or (no .py) one of the package's commands."""
    command = [sys.executable, str(SCRIPTS / name)] if name.endswith(".py") else [console(name)]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ONE_THREAD},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path: Path) -> None:
    proc = script("gpu_check.py", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu-check: error: needs a CUDA GPU (torch.cuda.is_available() is false here); "
        "--dry runs the same checks on the CPU with tiny nets"
    ]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> Any:
    """scripts/gpu_check.py as a module; the limit its main() sets in this process's
    environment for each measurement is as it was again after the test."""
    monkeypatch.setenv(WORKER_TIMEOUT, "600")
    return import_script("gpu_check.py", monkeypatch)


def test_gpu_check_refuses_data_that_is_not_there(
    gpu_check: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert gpu_check.main(["--dry", "--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"gpu-check: error: no CIFAR-10 in data.root='{tmp_path}'"
    )
    assert f"resnet-exp-data download {tmp_path}" in err[0]
    assert not out.exists()


def test_a_step_past_its_timeout_is_killed_with_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    benchtools = import_script("benchtools.py", monkeypatch)
    pids = tmp_path / "pids"
    hang = f"sleep 600 & echo $$ $! > {pids}; wait"  # a process and its child, both hanging
    done = benchtools.run_killable(["sh", "-c", hang], timeout_s=2)
    assert done.timed_out and done.error("the step") == "the step timed out after 2 s (killed)"
    started = [int(pid) for pid in pids.read_text().split()]
    deadline = time.monotonic() + 10  # SIGKILL is sent; the kernel takes a moment to end them
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in started if alive(pid)]
    quick = benchtools.run_killable([sys.executable, "-c", "print('ok')"], timeout_s=60)
    assert (quick.returncode, quick.stdout, quick.error("it")) == (0, "ok\n", None)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.slow  # ~20 s: gpu-check's steps killed at a 5 s timeout
def test_gpu_check_reports_a_hung_step_and_writes_its_summary(
    gpu_check: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    hung = tmp_path / "test_hang.py"
    hung.write_text("import time\n\ndef test_hangs():\n    time.sleep(3600)\n")
    monkeypatch.setattr(gpu_check, "CUDA_TESTS", [str(hung)])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "check"
    assert gpu_check.main(["--dry", "--timeout", "5", "--out", str(out)]) == 1
    result = json.loads((out / "summary.json").read_text())
    assert result["tests"]["error"] == "the tests timed out after 5 s (killed)"
    assert result["tests"]["errors"] == 1 and result["tests"]["exit"] is None
    assert "the tests timed out after 5 s (killed)" in (out / "summary.md").read_text()
    assert "gpu-check: tests: 0 passed" in capsys.readouterr().out


def test_the_default_campaign_plans_the_papers_sweeps() -> None:
    from resnet_exp.sweep import campaign as reproduce

    campaign = reproduce.load_campaign(reproduce.campaigns() / "default.yaml")
    plans = [reproduce.planned_jobs(s["overrides"]) for s in campaign["sweeps"]]
    assert [len(p) for p in plans] == [15, 10, 15, 25]  # 5 orderings x 3 seeds, then Table 2
    first = plans[0][0]
    assert "depth=20" in first and "seed=1" in first and "block=original" in first
    blocks = {o for j in plans[1] for o in j if o.startswith("block=")}
    assert blocks == {"block=original", "block=preact"}
    assert {o for j in plans[1] for o in j if o.startswith("seed=")} == {
        f"seed={i}" for i in range(1, 6)
    }
    assert all("net=resnet164" in j for j in plans[3])


@pytest.mark.slow  # ~15 s: a run cut by its limit through the command, then continued
def test_the_command_stops_at_its_limit_with_exit_75_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli([*LONG, "trainer.time_limit=12s", f"hydra.run.dir={run}"], tmp_path, check=False)
    assert proc.returncode == 75, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("interrupted", "time_limit")
    done = summary["steps_done"]
    assert 0 < done < summary["steps"] == 1000000
    assert read_checkpoint(run)["step"] == done
    assert f"after step {done} of 1000000" in proc.stderr and "Traceback" not in proc.stderr
    assert f"to continue: resnet-exp resume={run}" in proc.stderr
    # Continued (its overrides inherited), with a length it can finish.
    run_cli([f"resume={run}", f"trainer.max_steps={done + 10}"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == done + 10


@pytest.mark.slow  # ~30 s: a packed sweep at its deadline, then continued twice
def test_a_packed_sweep_ends_at_its_deadline_and_continues(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    packed = ["hydra/launcher=packed", "hydra.launcher.runs_per_device=2"]
    packed += ["hydra.launcher.threads_per_run=1", "seed=1,2,3", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(["-m", *LONG, *packed, "trainer.time_limit=12s"], tmp_path, check=False)
    assert proc.returncode == 75, proc.stderr
    names = ["0_preact_8", "1_preact_8", "2_preact_8"]
    steps = []
    for name in names[:2]:  # the two running runs checkpointed
        summary = json.loads((sweep / name / "summary.json").read_text())
        assert (summary["status"], summary["reason"]) == ("interrupted", "time_limit")
        steps.append(summary["steps_done"])
        assert read_checkpoint(sweep / name)["step"] == steps[-1]
    assert not (sweep / names[2]).exists()  # the third did not start
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"resnet-exp: 3 of 3 jobs left at the time limit: 0_preact_8 (step {steps[0]} of "
        f"1000000), 1_preact_8 (step {steps[1]} of 1000000), 2_preact_8 (not started); to "
        f"continue: rerun the same command with resume=auto hydra.sweep.dir={sweep}"
    )
    report = (sweep / "report.md").read_text().split("## Runs not finished")[1]
    assert f"step {steps[0]:,} of 1,000,000" in report

    # The same command with resume=auto (and a length the runs can finish) ends the sweep.
    finish = [a for a in LONG if not a.startswith("trainer.max_steps")]
    finish.append(f"trainer.max_steps={max(steps) + 10}")
    again = ["-m", *finish, *packed, "trainer.time_limit=10m", "resume=auto"]
    run_cli(again, tmp_path)
    for name in names:
        assert json.loads((sweep / name / "summary.json").read_text())["status"] == "completed"
    for name in names[:2]:
        assert "resumed from" in (sweep / name / "resnet-exp.log").read_text()
    # Once more: every run is finished, and is skipped.
    run_cli(again, tmp_path)
    assert "nothing to do" in (sweep / names[2] / "resnet-exp.log").read_text()
