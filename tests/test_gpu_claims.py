"""GPU claims for parallel sweep jobs: no two live processes hold the same GPU.

The holders are processes told when to let go (a line on their stdin), and the
waiting claim is observed through the line it logs when every GPU is taken: no
step of the test depends on how long anything takes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

from resnet_exp.run import gpus

# The module alone, loaded from its file: a holder starts in a moment without torch.
HOLDER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gpus", {gpus.__file__!r})
gpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpus)
print(gpus.claim_gpu(2, poll_s=0.05), flush=True)
sys.stdin.readline()  # the test says: let go
gpus.release()
print("released", flush=True)
sys.stdin.readline()  # then wait for the end of input
"""


class Seen(logging.Handler):
    """Sets an event when a record with ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_jobs_get_distinct_gpus_and_wait_when_all_are_taken(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RESNET_EXP_GPU_LOCKS", str(tmp_path))
    env = {
        "RESNET_EXP_GPU_LOCKS": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": ":".join(sys.path),
    }
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    waiting = Seen("are held by other jobs; waiting")
    logger = logging.getLogger("resnet_exp")
    logger.addHandler(waiting)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        claimed = [int(p.stdout.readline()) for p in holders]
        assert sorted(claimed) == [0, 1]  # two jobs, two different GPUs
        # A third job finds both taken and waits ...
        got: list[int] = []
        third = threading.Thread(target=lambda: got.append(gpus.claim_gpu(2, poll_s=0.05)))
        third.start()
        assert waiting.event.wait(timeout=120), "the third claim never found every GPU taken"
        assert not got
        # ... until a holder lets go: it gets that holder's GPU.
        holders[0].stdin.write("\n")
        holders[0].stdin.flush()
        assert holders[0].stdout.readline().strip() == "released"
        third.join(timeout=120)
        assert got == [claimed[0]]
    finally:
        logger.removeHandler(waiting)
        logger.setLevel(level)
        for p in holders:
            p.kill()
            p.wait()
            p.stdin.close()
            p.stdout.close()
    gpus.release()
    # Released (and the killed holder's lock dropped with its process): the same process
    # (a worker's next job) claims again at once.
    assert gpus.claim_gpu(2, poll_s=0.05) == 0
    gpus.release()
