"""GPU claims for parallel sweep jobs: no two live processes hold the same GPU."""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

from resnet_exp.train import gpus

HOLDER = """
import sys, time
from resnet_exp.train import gpus
print(gpus.claim_gpu(2, poll_s=0.1), flush=True)
time.sleep(float(sys.argv[1]))
print("releasing", flush=True)
gpus.release()
time.sleep(1)
"""


def test_jobs_get_distinct_gpus_and_wait_when_all_are_taken(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RESNET_EXP_GPU_LOCKS", str(tmp_path))
    env = {
        "RESNET_EXP_GPU_LOCKS": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": ":".join(sys.path),
    }
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(s)], stdout=subprocess.PIPE, text=True, env=env
        )
        for s in (3, 30)
    ]
    claimed = [int(p.stdout.readline()) for p in holders]
    assert sorted(claimed) == [0, 1]  # two jobs, two different GPUs
    # A third job waits until a holder lets go, then gets that holder's GPU.
    index = gpus.claim_gpu(2, poll_s=0.1)
    assert index == claimed[0]
    ready, _, _ = select.select([holders[0].stdout], [], [], 0)
    assert ready and holders[0].stdout.readline().strip() == "releasing"
    holders[1].kill()
    for p in holders:
        p.wait()
    gpus.release()
    # Released: the same process (a worker's next job) claims again at once.
    assert gpus.claim_gpu(2, poll_s=0.1) == 0
    gpus.release()
