"""Beyond one process: torchrun DDP (gloo on the CPU), submitit jobs, requeue on a signal.

Slow (``make test-slow``): each test starts several Python processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ONE_THREAD, console_script, run_cli

pytestmark = pytest.mark.slow

# Deterministic, unaugmented, constant lr: runs over 1 and 2 ranks compare exactly.
DDP_JOB = [
    "dataset=synthetic",
    "data.synthetic_train=512",
    "data.synthetic_test=128",
    "depth=8",
    "data.batch_size=64",
    "data.augment=false",  # the same images in each global batch, whatever the rank count
    "trainer.deterministic=true",
    "schedule.gamma=1",  # a constant lr: the same schedule for a 6-step and a 10-step run
    "trainer.log_every=5",
    "trainer.progress=false",
]
ENV = ONE_THREAD  # two processes on two cores


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "resnet_exp",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_torchrun_matches_single_process_and_resumes(tmp_path: Path) -> None:
    # Two processes, default (timestamped) run directory: one directory for both ranks.
    torchrun([*DDP_JOB, "trainer.max_steps=10"], cwd=tmp_path)
    runs = [p.parent.parent for p in (tmp_path / "outputs").rglob(".hydra/config.yaml")]
    assert len(runs) == 1, runs
    ddp = runs[0]
    assert len(list(ddp.glob("events.out.tfevents.*"))) == 1
    assert len((ddp / "resnet-exp.log").read_text().splitlines()) >= 2  # rank 0's log only
    s2 = summary(ddp)
    assert s2["processes"] == 2 and s2["steps_done"] == 10 and s2["batch_size"] == 64

    # One process, same global batch of 64: the same loss up to BatchNorm statistics,
    # which each rank computes over its own 32 images (0.3% apart after 10 steps, measured).
    single = tmp_path / "single"
    run_cli([*DDP_JOB, "trainer.max_steps=10", f"hydra.run.dir={single}"], cwd=tmp_path, env=ENV)
    s1 = summary(single)
    assert s1["processes"] == 1
    assert abs(s2["final_train_loss"] - s1["final_train_loss"]) / s1["final_train_loss"] < 0.02

    # Stopped at step 6 and resumed under torchrun: the same result as the run above.
    part = tmp_path / "part"
    torchrun([*DDP_JOB, "trainer.max_steps=6", f"hydra.run.dir={part}"], cwd=tmp_path)
    torchrun(["trainer.max_steps=10", f"resume={part}"], cwd=tmp_path)
    s3 = summary(part)
    assert s3["steps_done"] == 10
    assert s3["final_train_loss"] == s2["final_train_loss"]
    assert s3["final_test_error"] == s2["final_test_error"]


def test_submitit_local_sweep_runs_both_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "hydra/launcher=local",
            "block=original,preact",
            *DDP_JOB,
            "trainer.max_steps=4",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=ENV,
    )
    done = {d.name: summary(d) for d in sweep.iterdir() if (d / "summary.json").exists()}
    assert sorted(done) == ["0_original_8", "1_preact_8"]
    assert all(s["status"] == "completed" and s["steps_done"] == 4 for s in done.values())


def _job_pids(sweep: Path) -> list[int]:
    """The submitit task processes of this sweep (the ones running the training)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if "submitit.core._submit" in cmd and str(sweep) in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="needs SIGUSR2")
def test_requeued_job_resumes_instead_of_restarting(tmp_path: Path) -> None:
    """A cluster's preemption signal (SIGUSR2, as SLURM sends through submitit) makes
    the job checkpoint and requeue; the requeued job continues from that step."""
    sweep = tmp_path / "sweep"
    args = [
        console_script(),
        "-m",
        "hydra/launcher=local",
        *DDP_JOB,
        "data.synthetic_train=256",
        "data.batch_size=32",
        "trainer.max_steps=320",
        f"hydra.sweep.dir={sweep}",
    ]
    sweeper = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **ENV},
    )
    job = sweep / "0_preact_8"
    try:
        deadline = time.monotonic() + 300
        while not (job / "metrics.jsonl").exists() or len(_job_pids(sweep)) == 0:
            assert time.monotonic() < deadline and sweeper.poll() is None, "the job never started"
            time.sleep(0.2)
        for pid in _job_pids(sweep):
            os.kill(pid, signal.SIGUSR2)
        out, _ = sweeper.communicate(timeout=600)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    assert sweeper.returncode == 0, out[-3000:]
    log = (job / "resnet-exp.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "at step 0 " not in resumed[0], log[-2000:]
    s = summary(job)
    assert s["status"] == "completed" and s["steps_done"] == 320
    rows = [json.loads(r) for r in (job / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 41))  # every epoch once: no restart


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(nodes: int, per_node: int, port: int, args: list[str], extra: list[str]) -> list[str]:
    """torchrun with a c10d rendezvous on localhost, as each node of a cluster runs it."""
    return [
        str(Path(sys.executable).parent / "torchrun"),
        f"--nnodes={nodes}",
        f"--nproc_per_node={per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=resnet-exp-test",
        *extra,
        "-m",
        "resnet_exp",
        *args,
    ]


def weights(run: Path) -> dict:
    import torch

    return torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_nodes_of_one_process_train_one_run(tmp_path: Path) -> None:
    """Two torchrun "nodes" on localhost meet at a c10d rendezvous (gloo): one run,
    the same result as two processes on one node."""
    job = [*DDP_JOB, "trainer.max_steps=10"]
    run, port = tmp_path / "nodes", free_port()
    env = {**os.environ, **ENV}
    nodes = [
        subprocess.Popen(
            node_cmd(2, 1, port, [*job, f"hydra.run.dir={run}"], []),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    s = summary(run)
    assert s["status"] == "completed" and s["processes"] == 2 and s["steps_done"] == 10
    one_node = tmp_path / "one_node"
    torchrun([*job, f"hydra.run.dir={one_node}"], cwd=tmp_path)
    assert s["final_train_loss"] == summary(one_node)["final_train_loss"]
    assert_same_weights(weights(run), weights(one_node))
