"""The cluster and multi-GPU launchers: what ``hydra/launcher=slurm`` and ``slurm_ddp``
submit (the sbatch script submitit writes from them), and ``hydra/launcher=gpus``: the
joblib config and a job's GPU claim, released when the job ends however it ends."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch

from resnet_exp import cli
from resnet_exp.run import runtime
from resnet_exp.run.result import RunResult, Status

from conftest import TINY, run_main


class Submitted(Exception):
    """Raised instead of calling sbatch: carries the executor the launcher built."""

    def __init__(self, executor: Any, jobs: int) -> None:
        super().__init__("submission intercepted")
        self.executor, self.jobs = executor, jobs


def submission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]):
    """The submitit executor the command builds for a sweep, and its sbatch script."""

    def map_array(self: Any, fn: Any, *params: Any) -> None:
        raise Submitted(self, len(params[0]))

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    # submitit's SLURM executor looks for srun; nothing runs it here
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(Submitted) as info:
        run_main(["-m", *args, f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path)
    slurm = info.value.executor._executor  # submitit's SlurmExecutor
    return info.value, slurm, slurm._make_submission_file_text("python job.py", "uid")


def sbatch_options(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            out[key] = value
    return out


def test_slurm_launcher_submits_one_gpu_jobs_that_checkpoint_before_their_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted, slurm, script = submission(
        tmp_path,
        monkeypatch,
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "block=original,preact"],
    )
    assert submitted.jobs == 2 and slurm.max_num_timeout == 20  # requeued up to 20 times
    opts = sbatch_options(script)
    # SIGUSR2 120 s before the time limit: the loop stops, writes last.pt; then requeue
    assert opts["signal"] == "USR2@120"
    assert opts["time"] == "1440" and opts["partition"] == "gpu"
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"]) == ("1", "1", "1")
    assert (opts["cpus-per-task"], opts["mem"]) == ("8", "32GB")
    assert slurm.parameters["array_parallelism"] == 64  # a job array, 64 at a time
    assert "srun" in script, script


def test_slurm_ddp_launcher_runs_one_task_per_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, slurm, script = submission(
        tmp_path, monkeypatch, ["hydra/launcher=slurm_ddp", "block=preact", "depth=1001"]
    )
    opts = sbatch_options(script)
    # one data-parallel run over 4 GPUs: 4 tasks, each a rank (distributed.init_distributed)
    assert (opts["ntasks-per-node"], opts["gpus-per-node"], opts["nodes"]) == ("4", "4", "1")
    assert opts["signal"] == "USR2@120" and opts["mem"] == "128GB"
    assert slurm._num_tasks() == 4 and slurm.max_num_timeout == 20


def test_gpus_launcher_is_joblib_with_processes() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        cfg = compose(
            "config", overrides=["hydra/launcher=gpus", "hydra.launcher.n_jobs=4"],
            return_hydra_config=True,
        )  # fmt: skip
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    # processes, not threads: each job's GPU lock (an flock) is its own process's
    assert (launcher.n_jobs, launcher.backend) == (4, "loky")


def locked(lock_dir: Path, index: int) -> bool:
    """Whether some job holds GPU ``index`` (an flock on another open file description
    conflicts even within this process)."""
    with open(lock_dir / f"gpu{index}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_each_job_claims_a_gpu_and_releases_it_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two visible GPUs (faked), a sweep of three jobs in one worker process, as a
    joblib worker runs them: each job claims a GPU as a run's set-up does
    (trainer.device=auto) and gives it back when it ends: completed, failed or
    refused."""
    locks = tmp_path / "locks"
    monkeypatch.setenv("RESNET_EXP_GPU_LOCKS", str(locks))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    seen: list[tuple[int, list[bool], torch.device, list[bool]]] = []
    claims: list[list[bool]] = []  # the locks as each claim found them
    real_claim = runtime.claim_gpu

    def claim(count: int, poll_s: float = 5.0) -> int:
        claims.append([locked(locks, i) for i in range(2)] if locks.exists() else [False, False])
        return real_claim(count, poll_s)

    def run(cfg: Any, ctx: Any) -> RunResult:  # the job, in the context its command resolved
        seen.append((cfg.seed, claims[-1], ctx.device, [locked(locks, i) for i in range(2)]))
        if cfg.seed == 2:
            raise RuntimeError("injected fault")
        if cfg.seed == 3:
            from resnet_exp.errors import UserError

            raise UserError("injected bad value")
        return RunResult(Status.completed, {"status": "completed"})

    monkeypatch.setattr(runtime, "claim_gpu", claim)
    monkeypatch.setattr(cli, "run", run)
    result = run_main(
        ["-m", "seed=1,2,3", *[o for o in TINY if not o.startswith("trainer.device")],
         "trainer.precision=fp32",  # (auto would ask the faked GPUs whether they have bf16)
         "~hydra.callbacks.report", f"hydra.sweep.dir={tmp_path / 's'}"],
        tmp_path,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1  # two failed jobs
    assert [s[0] for s in seen] == [1, 2, 3]
    for _, before, device, during in seen:
        assert before == [False, False]  # the previous job gave its GPU back
        assert device == torch.device("cuda", 0) and during == [True, False]
    assert [locked(locks, i) for i in range(2)] == [False, False]
