"""One GPU per job when several jobs share a machine.

Parallel sweep jobs (e.g. the joblib launcher) each call ``claim_gpu``: it
takes an exclusive lock on the first GPU no other job holds, so jobs never
land on the same GPU whatever order the launcher runs them in. The lock is an
flock on a file, released when the job ends or its process dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO

log = logging.getLogger("resnet_exp")
_held: IO[str] | None = None


def lock_dir() -> Path:
    path = Path(
        os.environ.get("RESNET_EXP_GPU_LOCKS")
        or Path(tempfile.gettempdir()) / f"resnet-exp-gpus-{os.getuid()}"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def claim_gpu(count: int, poll_s: float = 5.0) -> int:
    """Index of a GPU this process now holds alone; waits while all are taken."""
    global _held
    release()
    waited = False
    while True:
        for index in range(count):
            handle = open(lock_dir() / f"gpu{index}.lock", "w")  # noqa: SIM115 (held open on purpose)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held = handle
            return index
        if not waited:
            log.info("all %d GPUs are held by other jobs; waiting for one", count)
            waited = True
        time.sleep(poll_s)


def release() -> None:
    global _held
    if _held is not None:
        _held.close()  # closing the file drops the lock
        _held = None
