"""Beyond one process: torchrun DDP (gloo on the CPU), submitit jobs, requeue on a signal.

Slow (``make test-slow``): each test starts several Python processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_exp.run.records import read_metrics

from conftest import (
    ONE_THREAD,
    assert_same_tensors,
    read_checkpoint,
    read_summary,
    run_main,
    start_command,
    torchrun,
)

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


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 steps over two processes (torchrun), in the default (timestamped) run directory."""
    cwd = tmp_path_factory.mktemp("ddp")
    torchrun([*DDP_JOB, "trainer.max_steps=10"], cwd=cwd)
    runs = [p.parent.parent for p in (cwd / "outputs").rglob(".hydra/config.yaml")]
    assert len(runs) == 1, runs  # one directory for both ranks
    return runs[0]


def test_torchrun_matches_single_process_and_resumes(tmp_path: Path, two_processes: Path) -> None:
    ddp = two_processes
    assert len(list(ddp.glob("events.out.tfevents.*"))) == 1
    assert len((ddp / "resnet-exp.log").read_text().splitlines()) >= 2  # rank 0's log only
    s2 = read_summary(ddp)
    assert s2["processes"] == 2 and s2["steps_done"] == 10 and s2["batch_size"] == 64

    # One process, same global batch of 64: the same loss up to BatchNorm statistics,
    # which each rank computes over its own 32 images (0.3% apart after 10 steps, measured).
    single = tmp_path / "single"
    run_main([*DDP_JOB, "trainer.max_steps=10", f"hydra.run.dir={single}"], cwd=tmp_path)
    s1 = read_summary(single)
    assert s1["processes"] == 1
    assert abs(s2["final_train_loss"] - s1["final_train_loss"]) / s1["final_train_loss"] < 0.02

    # Stopped at step 6 and resumed under torchrun: the same result as the run above.
    part = tmp_path / "part"
    torchrun([*DDP_JOB, "trainer.max_steps=6", f"hydra.run.dir={part}"], cwd=tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(part, moved)
    torchrun(["trainer.max_steps=10", f"resume={part}"], cwd=tmp_path)
    s3 = read_summary(part)
    assert s3["steps_done"] == 10
    assert s3["final_train_loss"] == s2["final_train_loss"]
    assert s3["final_test_error"] == s2["final_test_error"]

    # The 2-process run stopped at step 6 continued on one process: the same images at each
    # step (the data order is kept), so the loss of the 2-process run up to BatchNorm's
    # statistics over 64 images instead of 2 x 32, as above; said once in the log.
    run_main(["trainer.max_steps=10", f"resume={moved}"], cwd=tmp_path)
    s4 = read_summary(moved)
    assert (s4["steps_done"], s4["processes"], s4["parts"]) == (10, 1, 2)
    assert abs(s4["final_train_loss"] - s2["final_train_loss"]) / s2["final_train_loss"] < 0.02
    log = (moved / "resnet-exp.log").read_text()
    assert log.count("continuing a run made elsewhere (processes 2 -> 1)") == 1


def test_submitit_local_sweep_runs_both_jobs(tmp_path: Path, monkeypatch) -> None:
    """The sweep from this process; its jobs in processes of their own (one thread each)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = tmp_path / "sweep"
    run_main(
        ["-m", "hydra/launcher=local", "block=original,preact", *DDP_JOB, "trainer.max_steps=4",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    done = {d.name: read_summary(d) for d in sweep.iterdir() if (d / "summary.json").exists()}
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
        "-m",
        "hydra/launcher=local",
        *DDP_JOB,
        "data.synthetic_train=256",
        "data.batch_size=32",
        "trainer.max_steps=320",
        f"hydra.sweep.dir={sweep}",
    ]
    sweeper = start_command(args, tmp_path)
    job = sweep / "0_preact_8"
    try:
        deadline = time.monotonic() + 300
        while not (job / "metrics.jsonl").exists() or len(_job_pids(sweep)) == 0:
            assert time.monotonic() < deadline and sweeper.poll() is None, "the job never started"
            time.sleep(0.2)
        for pid in _job_pids(sweep):
            os.kill(pid, signal.SIGUSR2)
        done = sweeper.result(timeout=600)
    finally:
        if sweeper.poll() is None:
            sweeper.send_signal(signal.SIGKILL)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    log = (job / "resnet-exp.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "at step 0 " not in resumed[0], log[-2000:]
    s = read_summary(job)
    assert s["status"] == "completed" and s["steps_done"] == 320
    rows = read_metrics(job / "metrics.jsonl")
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


def test_two_nodes_of_one_process_train_one_run(tmp_path: Path, two_processes: Path) -> None:
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
    s = read_summary(run)
    assert s["status"] == "completed" and s["processes"] == 2 and s["steps_done"] == 10
    one_node = two_processes  # the same job over two processes of one torchrun
    assert s["final_train_loss"] == read_summary(one_node)["final_train_loss"]
    assert_same_tensors(read_checkpoint(run)["model"], read_checkpoint(one_node)["model"])


# --- elastic recovery: a worker killed, torchrun restarts the group, resume=auto ---------

# 6 epochs of 8 steps: a checkpoint closes each epoch, the kill comes after the first.
ELASTIC_JOB = [*DDP_JOB, "trainer.max_steps=48", "resume=auto"]
AGENT_TIMEOUT_S = 240  # a hang fails the test instead of outliving it


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def _stop(agents: list[subprocess.Popen]) -> None:
    """Kill what is left: each worker's session (torchrun starts each in its own), then the
    agents' own."""
    for agent in agents:
        for worker in _children(agent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker, signal.SIGKILL)
    for agent in agents:
        if agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)


def _run_agents(cmds: list[list[str]], cwd: Path, kill_rank: int | None = None) -> None:
    """Start one torchrun agent per command; with ``kill_rank``, SIGKILL that rank's worker
    once the run's first checkpoint exists. Every agent must exit 0 within the timeout."""
    env = {**os.environ, **ENV}
    logs = [cwd / f"agent{i}.log" for i in range(len(cmds))]
    agents = []
    try:
        for cmd, log in zip(cmds, logs):
            with log.open("w") as out:  # the child holds its own copy of the file
                agents.append(
                    subprocess.Popen(
                        cmd,
                        cwd=cwd,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        if kill_rank is not None:
            run = Path(next(a for a in cmds[0] if a.startswith("hydra.run.dir=")).split("=", 1)[1])
            while not (run / "last.pt").exists():
                assert all(a.poll() is None for a in agents), "an agent ended before a checkpoint"
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.02)
            workers = [w for a in agents for w in _children(a.pid)]
            victim = [w for w in workers if _environ(w).get("RANK") == str(kill_rank)]
            assert len(victim) == 1, (workers, victim)
            os.kill(victim[0], signal.SIGKILL)
        for agent in agents:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # reported below, with the agents' logs
    finally:
        _stop(agents)
    for agent, log in zip(agents, logs):
        assert agent.returncode == 0, f"{log.name} ({agent.returncode}):\n{log.read_text()[-3000:]}"


def _standalone(run: Path, extra: list[str]) -> list[str]:
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        *extra,
        "-m",
        "resnet_exp",
        *ELASTIC_JOB,
        f"hydra.run.dir={run}",
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job over two processes, never interrupted."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    _run_agents([_standalone(cwd / "run", [])], cwd)
    return cwd / "run"


def assert_recovered(run: Path, reference: Path) -> None:
    """One restart resumed from a checkpoint of the first start, mid-run, and the run ended
    as the uninterrupted one: the same weights, records and losses."""
    log = (run / "resnet-exp.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, log[-3000:]
    step = int(resumed[0].split(" at step ")[1].split()[0])
    assert 0 < step < 48 and step % 8 == 0, resumed[0]
    s, ref = read_summary(run), read_summary(reference)
    assert s["status"] == "completed" and s["steps_done"] == 48 and s["processes"] == 2
    assert s["final_train_loss"] == ref["final_train_loss"]
    assert s["final_test_error"] == ref["final_test_error"]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, 7))  # the redone epochs once each
    assert_same_tensors(read_checkpoint(run)["model"], read_checkpoint(reference)["model"])


def test_killed_worker_restarts_and_resumes(tmp_path: Path, uninterrupted: Path) -> None:
    """torchrun --max-restarts=1 on one node: a worker SIGKILLed mid-run, the agent stops the
    other and starts both again; with resume=auto they continue from last.pt (deterministic
    on the CPU: the same weights, bit for bit, as the run never interrupted)."""
    run = tmp_path / "run"
    _run_agents([_standalone(run, ["--max-restarts=1"])], tmp_path, kill_rank=1)
    assert_recovered(run, uninterrupted)


def test_killed_node_worker_restarts_both_nodes(tmp_path: Path, uninterrupted: Path) -> None:
    """Two one-process "nodes" (c10d rendezvous): rank 0's worker, the one that writes the
    run directory, SIGKILLed mid-run; both agents restart and the run ends as if never
    interrupted."""
    run, port = tmp_path / "run", free_port()
    job = [*ELASTIC_JOB, f"hydra.run.dir={run}"]
    cmd = node_cmd(2, 1, port, job, ["--max-restarts=1"])
    _run_agents([cmd, cmd], tmp_path, kill_rank=0)
    assert_recovered(run, uninterrupted)
