"""``resume=auto``: a single run started or continued from its directory, and a sweep
stopped by Ctrl-C through the console script (exit 130) then continued by the same
command on Hydra's basic launcher: finished jobs skipped, the stopped one continued,
the unstarted one started."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from resnet_exp.run.records import read_metrics

from conftest import (
    TINY,
    assert_same_tensors,
    read_checkpoint,
    read_summary,
    run_main,
    signal_after_first_evaluation,
)

# A constant lr after no warm-up: a run cut short by max_steps has the schedule of a
# longer one (the paper's milestones are fractions of the run's length).
FLAT = [
    *TINY,
    "trainer.log_every=5",
    "trainer.deterministic=true",
    "schedule.gamma=1.0",
    "schedule.warmup=false",
]
STEPS_PER_EPOCH = 16


def test_single_run_resume_auto_starts_continues_and_stops_at_its_end(tmp_path: Path) -> None:
    run, straight = tmp_path / "run", tmp_path / "straight"
    auto = [*FLAT, "resume=auto", f"hydra.run.dir={run}"]
    # No last.pt yet: a new run.
    first = run_main([*auto, "trainer.max_steps=20"], tmp_path)
    assert "resumed from" not in first.stdout + first.stderr
    assert read_summary(run)["steps_done"] == 20
    # Its last.pt: continued from step 20, ending as a run never stopped.
    second = run_main([*auto, "trainer.max_steps=40"], tmp_path)
    log = (run / "resnet-exp.log").read_text()
    assert f"resumed from {run / 'last.pt'} at step 20 (epoch 2)" in log, second.stderr
    run_main([*FLAT, "trainer.max_steps=40", f"hydra.run.dir={straight}"], tmp_path)
    a, b = (read_checkpoint(d) for d in (run, straight))
    for key in ("model", "optimizer", "loader", "step"):
        assert_same_tensors(a[key], b[key], key)
    assert read_summary(run)["status"] == "completed" and read_summary(run)["steps_done"] == 40
    # At its end: nothing more to do, nothing rewritten.
    before = (run / "last.pt").read_bytes()
    run_main([*auto, "trainer.max_steps=40"], tmp_path)
    assert (
        "already at the run's last step 40; nothing to do" in (run / "resnet-exp.log").read_text()
    )
    assert (run / "last.pt").read_bytes() == before


@pytest.mark.slow  # two commands of the console script: ~25 s on a busy 2-core CPU
def test_ctrl_c_stops_a_sweep_and_resume_auto_continues_it(tmp_path: Path) -> None:
    """Three jobs of a sweep: the first ends, Ctrl-C stops the second in its loop, the
    third never starts. The same sweep with resume=auto skips the first, continues the
    second from its checkpoint and starts the third."""
    sweep = tmp_path / "s"
    jobs = [sweep / f"{i}_preact_8" for i in range(3)]
    # The second job would run for hours: only Ctrl-C ends it in the first command.
    args = ["-m", *FLAT, f"hydra.sweep.dir={sweep}"]
    rc, text = signal_after_first_evaluation(  # the second job is past an epoch
        [*args, "trainer.max_steps=16,10000000,16"],
        tmp_path,
        [jobs[1] / "metrics.jsonl"],
        signal.SIGINT,
    )
    assert rc == 130, text
    assert "Traceback" not in text and text.count("SIGINT received") == 1, text
    stopped = read_summary(jobs[1])
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGINT"
    step = stopped["steps_done"]
    assert step >= STEPS_PER_EPOCH
    assert f"stopped by SIGINT after step {step}; checkpoint: {jobs[1] / 'last.pt'}" in text
    assert f"to continue: rerun the same command with resume=auto hydra.sweep.dir={sweep}" in text
    assert read_summary(jobs[0])["status"] == "completed" and not jobs[2].exists()
    finished = {f: (jobs[0] / f).read_bytes() for f in ("last.pt", "summary.json")}

    # The same sweep, resume=auto (the stopped job now with an end in reach).
    length = step + STEPS_PER_EPOCH + 3  # mid-epoch
    run_main([*args, f"trainer.max_steps=16,{length},16", "resume=auto"], tmp_path)
    assert {f: (jobs[0] / f).read_bytes() for f in finished} == finished  # skipped
    assert "nothing to do" in (jobs[0] / "resnet-exp.log").read_text()
    log = (jobs[1] / "resnet-exp.log").read_text()
    assert f"resumed from {jobs[1] / 'last.pt'} at step {step}" in log
    assert (read_summary(jobs[1])["status"], read_summary(jobs[1])["steps_done"]) == (
        "completed",
        length,
    )
    rows = read_metrics(jobs[1] / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # one record, no restart
    assert rows[-1]["step"] == length
    assert "resumed from" not in (jobs[2] / "resnet-exp.log").read_text()
    assert (read_summary(jobs[2])["status"], read_summary(jobs[2])["steps_done"]) == (
        "completed",
        16,
    )
    assert (sweep / "report.md").exists()
