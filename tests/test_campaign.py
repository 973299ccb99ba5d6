"""resnet-exp-reproduce never reports a failure as success: failed and diverged runs are
not ended, are tried again up to a limit (campaign.json keeps each reason), and a call
in which a run failed exits 1 with the failures first; missing data stops a call before
anything is written."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from resnet_exp.sweep import campaign as reproduce

from conftest import ONE_THREAD, command_env, console_script, fork_server

# Two tiny synthetic runs per sweep; the second asks for a batch larger than its data
# set, which every run of it refuses at the start (a failure with the same reason each time).
TINY = [
    "dataset=synthetic",
    "data.synthetic_train=64",
    "data.synthetic_test=16",
    "data.image_size=8",
    "depth=8",
    "trainer.device=cpu",
    "trainer.progress=false",
    "hydra.launcher.threads_per_run=1",
    "trainer.max_steps=2",
]
EXIT_AT_LIMIT = reproduce.EXIT_TIME_LIMIT


def campaign_file(tmp_path: Path, sweep: list[str]) -> Path:
    path = tmp_path / "campaign.yaml"
    text = {
        "runs_per_device": 2,
        "overrides": TINY,
        "sweeps": [{"name": "a_pair", "about": "two runs", "overrides": sweep}],
    }
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


def write_run(sweep_dir: Path, name: str, summary: dict | None) -> Path:
    """A run folder as a sweep leaves it: .hydra/, and its summary.json if it ended."""
    run = sweep_dir / name
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_failed_and_diverged_runs_are_not_ended(tmp_path: Path) -> None:
    write_run(tmp_path, "0_preact_8", {"status": "completed"})
    write_run(tmp_path, "1_preact_8", {"status": "failed", "error": "no memory"})
    write_run(tmp_path, "2_preact_8", {"status": "diverged", "diverged_at_step": 7})
    write_run(tmp_path, "3_preact_8", {"status": "interrupted", "steps_done": 3, "steps": 9})
    state = reproduce.sweep_state(tmp_path, planned=5)
    assert not state["done"]
    assert state["failed"] == {
        "1_preact_8": "failed: no memory",
        "2_preact_8": "diverged: diverged at step 7",
    }
    assert state["unfinished"] == ["3_preact_8 (step 3 of 9)"]
    assert state["not_started"] == 1
    for name in ("1_preact_8", "2_preact_8", "3_preact_8"):
        (tmp_path / name / "summary.json").write_text('{"status": "completed"}')
    write_run(tmp_path, "4_preact_8", {"status": "completed"})
    assert reproduce.sweep_state(tmp_path, planned=5)["done"]


class FakeSweep:
    """Stands in for the sweep's process (``resnet-exp -m``, seconds to start): writes
    what it leaves on disk, run 0 completing and run 1 failing each time it is
    launched, and the Reporter's last line."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, sweep, common, args, left_s, log: Path) -> int:
        self.calls += 1
        sweep_dir = args.campaign / sweep["name"]
        write_run(sweep_dir, "0_preact_8", {"status": "completed"})
        run = write_run(sweep_dir, "1_preact_8", None)
        if not (run / "summary.json").exists():  # the campaign set the last one aside
            (run / "summary.json").write_text('{"status": "failed", "error": "out of memory"}')
        log.write_text("resnet-exp: 1 of 2 jobs failed: 1_preact_8 (failed); details ...\n")
        return 1


def test_a_failing_run_is_retried_twice_then_reported_never_as_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    fake = FakeSweep()
    monkeypatch.setattr(reproduce, "run_sweep", fake)
    config = campaign_file(tmp_path, ["seed=1,2"])
    out = tmp_path / "campaign"
    argv = ["--config", str(config), "--budget", "5m", "--out", str(out)]
    key = "a_pair/1_preact_8"
    for call in (1, 2, 3):
        assert reproduce.main(argv) == 1
        printed = capsys.readouterr().out
        after_sweeps = printed.split("runs), ")[1].split("\n", 1)[1]
        assert after_sweeps.startswith("reproduce: 1 runs failed in this call:\n")  # first
        assert f"  {key}: failed: out of memory (" in printed
        assert ("(the same reason as its last try;" in printed) == (call > 1)
        assert "the campaign is complete" not in printed
        state = json.loads((out / "campaign.json").read_text())
        assert [f["call"] for f in state["failures"][key]] == list(range(1, call + 1))
        assert state["sweeps"]["a_pair"]["done"] is False
        assert state["calls"][-1]["failed"] == [key]
    assert fake.calls == 3 and state["retries"] == 2
    # The earlier tries' summaries are kept beside the last one.
    run = out / "a_pair" / "1_preact_8"
    assert sorted(p.name for p in run.glob("summary*.json")) == [
        "summary.failed-1.json",
        "summary.failed-2.json",
        "summary.json",
    ]
    # Retries used up: the sweep is not run again, and the call still fails.
    assert reproduce.main(argv) == 1
    printed = capsys.readouterr().out
    assert fake.calls == 3
    assert "1 runs failed on each of their 3 tries" in printed
    assert f"  {key}: failed 3 times, last: failed: out of memory" in printed
    assert "the campaign is not complete" in printed
    # More retries allowed: it runs again.
    assert reproduce.main([*argv, "--retries", "3"]) == 1
    assert fake.calls == 4


def test_a_run_not_reached_keeps_its_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep cut short before it reached a failed run: its summary comes back as it was,
    and no failure is counted for a try that did not happen."""
    sweep_dir = tmp_path / "campaign" / "a_pair"
    write_run(sweep_dir, "0_preact_8", {"status": "completed"})
    write_run(sweep_dir, "1_preact_8", {"status": "failed", "error": "out of memory"})
    monkeypatch.setattr(reproduce, "run_sweep", lambda *a: EXIT_AT_LIMIT)
    config = campaign_file(tmp_path, ["seed=1,2"])
    argv = ["--config", str(config), "--budget", "5m", "--out", str(tmp_path / "campaign")]
    (tmp_path / "campaign" / "a_pair.log").write_text("")
    assert reproduce.main(argv) == 0
    summary = json.loads((sweep_dir / "1_preact_8" / "summary.json").read_text())
    assert summary == {"status": "failed", "error": "out of memory"}
    assert not list((sweep_dir / "1_preact_8").glob("summary.*.json"))
    state = json.loads((tmp_path / "campaign" / "campaign.json").read_text())
    assert state["failures"] == {} and not state["sweeps"]["a_pair"]["done"]


def test_a_fresh_process_plans_a_presets_sweeps(tmp_path: Path) -> None:
    """The campaign composes the command's configs itself (in a process where the
    command's module was never imported: its schema must be registered there too)."""
    code = (
        "from resnet_exp.sweep.campaign import planned_jobs\n"
        "print(len(planned_jobs(['+experiment=table2', 'scale=short'])))"
    )
    result = fork_server().run_code(code, tmp_path, command_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["10"]  # Table 2 short: two nets x five orderings, one seed


def test_missing_data_stops_the_call_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("RESNET_EXP_DATA", str(empty))
    out = tmp_path / "campaign"
    argv = ["--dry", "--out", str(out), "dataset=cifar10", "data.download=false"]
    with pytest.raises(SystemExit) as info:
        reproduce.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"reproduce: error: no CIFAR-10 in data.root='{empty}'")
    assert f"RESNET_EXP_DATA={empty}" in err[0]
    assert f"resnet-exp-data download {empty} --dataset cifar10" in err[0]
    assert not out.exists()


@pytest.mark.slow  # ~45 s: two calls of a real sweep, one of whose runs fails
def test_a_real_failing_run_is_retried_and_named_with_its_reason(tmp_path: Path) -> None:
    config = campaign_file(tmp_path, ["seed=1", "data.batch_size=16,1000"])
    out = tmp_path / "campaign"
    cmd = [str(Path(console_script()).with_name("resnet-exp-reproduce"))]
    cmd += ["--config", str(config), "--budget", "5m", "--out", str(out), "--retries", "1"]
    env = {**os.environ, **ONE_THREAD}
    why = "failed: data.batch_size=1000 is larger than the 64 training images"
    key = "a_pair/1_preact_8"
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"reproduce: 1 runs failed in this call:\n  {key}: {why} (try 1 of 2)" in first.stdout
    state = json.loads((out / "campaign.json").read_text())
    assert state["sweeps"]["a_pair"]["counts"] == {"completed": 1, "failed": 1}
    assert not state["sweeps"]["a_pair"]["done"]

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"{key}: {why} (the same reason as its last try; try 2 of 2)" in second.stdout
    assert f"{key}: failed 2 times, last: {why}" in second.stdout
    assert (out / "a_pair" / "1_preact_8" / "summary.failed-1.json").is_file()
    assert "the campaign is not complete" in second.stdout
    log = (out / "a_pair.log").read_text()
    assert log.count("nothing to do") == 1  # the completed run was skipped, not trained again
