"""Checkpoints written atomically: a crash mid-write never leaves a broken last.pt."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from resnet_exp.errors import UserError

CHECKPOINT = "last.pt"
# What a checkpoint needs for an exact continuation (see train/loop.py, train/resume.py).
REQUIRED = ("model", "optimizer", "scheduler", "scaler", "loader", "rng", "step")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    The rename is atomic, so ``path`` always holds either the previous complete
    checkpoint or the new one, whenever the process dies (SIGKILL, power loss).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint; a missing, truncated or foreign file is a UserError naming it.

    ``mmap=True`` maps the tensors instead of reading them: cheap when only the
    small entries (config, step) are needed.
    """
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # The checkpoint holds RNG states and plain containers besides tensors.
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # unpickling a damaged file can fail in many ways
        raise UserError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); cannot resume from it"
        ) from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise UserError(f"checkpoint {path} is not a resnet-exp training checkpoint")
    return state
