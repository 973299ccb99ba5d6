"""GPU claims for parallel sweep jobs: no two live processes hold the same GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from resnet_exp.train import gpus

HOLDER = """
import sys, time
from resnet_exp.train.gpus import claim_gpu
print(claim_gpu(int(sys.argv[1]), poll_s=0.1), flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_jobs_get_distinct_gpus_and_wait_when_all_are_taken(tmp_path: Path, monkeypatch) -> None:
    env = {
        "RESNET_EXP_GPU_LOCKS": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": ":".join(sys.path),
    }
    monkeypatch.setenv("RESNET_EXP_GPU_LOCKS", str(tmp_path))
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, "2", "6"], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    claimed = [int(p.stdout.readline()) for p in holders]
    assert sorted(claimed) == [0, 1]  # two jobs, two different GPUs
    # A third job waits until one of them ends, then gets the freed GPU.
    index = gpus.claim_gpu(2, poll_s=0.1)
    holder_ended = holders[claimed.index(index)].poll() is not None
    for p in holders:
        p.wait()
    assert holder_ended  # it got the GPU only once that GPU's holder was gone
    gpus.release()
    # Released: the same process (the next job of a worker) claims again at once.
    assert gpus.claim_gpu(2, poll_s=0.1) == 0
    gpus.release()
