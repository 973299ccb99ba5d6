"""Checkpoints written atomically: a crash mid-write never leaves a broken last.pt."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from resnet_exp.errors import UserError

CHECKPOINT = "last.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        # The checkpoint holds RNG states and plain containers besides tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {path} does not exist") from e
    except (
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
    ) as e:
        raise UserError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); cannot resume from it"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"checkpoint {path} is not a resnet-exp checkpoint")
    return state


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``auto``: this run directory's last.pt if there is one; a directory: its last.pt."""
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        path = run_dir / CHECKPOINT
        return path if path.exists() else None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise UserError(
            f"resume={resume!r}: {path} does not exist (pass a last.pt, its run directory, or auto)"
        )
    return path
