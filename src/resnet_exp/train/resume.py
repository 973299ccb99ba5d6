"""Resuming, in one place: which checkpoint, whether this config may continue it,
and handing its state to the run's owners.

A checkpoint stores the run's full config and the overrides it was started
with. ``resume=PATH`` reuses those overrides (so ``resnet-exp resume=DIR`` alone
continues the run as it was), and overrides given with it take precedence:
a longer run or another logging interval is allowed and logged; another model,
data set, batch or seed is refused with the keys that differ.

``Resume.find`` loads and checks a checkpoint once, before any data is loaded;
the trainer then calls ``apply`` with its state owners.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from resnet_exp.config import flatten
from resnet_exp.errors import UserError
from resnet_exp.train.checkpoint import CHECKPOINT, load_checkpoint

log = logging.getLogger("resnet_exp")

# What the net computes and which images its splits hold: an evaluation of a
# checkpoint must match these. (A prefix covers every key below it.)
NET_AND_DATA = (
    "model",
    "depth",
    "data.name",
    "data.image_size",
    "data.train_limit",
    "data.val_size",
    "data.num_classes",
    "data.synthetic_train",
    "data.stream",
)
# The weights and the data order depend on these too: changing one makes the
# continuation another experiment.
FIXED = (
    *NET_AND_DATA,
    "seed",
    "mode",
    "data.batch_size",
    "data.augment",
    "data.pad",
    "data.pad_value",
    "data.interpolation",
    "optimizer.name",
    "schedule.name",
)
# How to run, not what: never compared, never inherited.
NOT_INHERITED = (
    "resume",
    "dry_run",
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra.output_subdir",
)
# ``resume=`` values that mean "start a new run"; ``auto`` continues this run
# directory's last.pt when there is one.
NO_RESUME = (None, "", "none", "null")
AUTO = "auto"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any, /) -> Any: ...


@dataclass
class Resume:
    """A loaded, checked checkpoint to continue from."""

    path: Path
    state: dict[str, Any]
    changes: list[str]  # allowed config changes, ``key: old -> new``

    @classmethod
    def find(
        cls, resume: str | None, run_dir: Path, flat: dict[str, Any], world: int, fresh_ok: bool
    ) -> Resume | None:
        """The checkpoint ``resume`` names, loaded and checked against this config;
        None for a new run. ``fresh_ok=False`` refuses a new run over an existing one."""
        path = resolve(resume, run_dir)
        if path is None:
            if not fresh_ok and (run_dir / CHECKPOINT).exists():
                raise UserError(
                    f"{run_dir} already holds a run ({CHECKPOINT}); continue it with "
                    f"resume={run_dir} (or resume=auto), or pass another hydra.run.dir"
                )
            return None
        state = load_checkpoint(path)
        changes = check_resumable(state, flat, path)
        if state.get("world", 1) != world:
            raise UserError(
                f"{path} was written by a run of {state.get('world', 1)} processes; resume it "
                f"with the same number (this run has {world}): the data order is split by rank"
            )
        return cls(path, state, changes)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def check_length(self, total_steps: int) -> None:
        if self.step > total_steps:
            raise UserError(
                f"{self.path} is at step {self.step}, past this run's {total_steps} steps; "
                f"pass a larger trainer.max_steps or trainer.epochs"
            )

    def apply(self, owners: dict[str, Stateful], rank: int | None = None) -> None:
        """Load each owner's state; ``rank``: a data-parallel run's own rank, whose
        data position, RNG and running sums differ from the others'."""
        state = {**self.state, **self.state["ranks"][rank]} if rank is not None else self.state
        for name, owner in owners.items():
            if name in state:  # older checkpoints hold no running metrics
                owner.load_state_dict(state[name])
        for change in self.changes:
            log.info("resuming with a changed setting: %s", change)
        if any(c.startswith(("trainer.epochs", "trainer.max_steps")) for c in self.changes):
            log.info(
                "the learning-rate schedule continues as saved (milestones of the original length)"
            )


def checkpoint_path(resume: str) -> Path:
    """The checkpoint a ``resume=PATH`` names: the file, or a run directory's last.pt."""
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(
            f"resume={resume!r}: {path} does not exist (pass a last.pt, its run directory, or auto)"
        )
    return path


def resolve(resume: str | None, run_dir: Path) -> Path | None:
    """``auto``: this run directory's last.pt if there is one; a directory: its last.pt."""
    if resume in NO_RESUME:
        return None
    if resume == AUTO:
        path = run_dir / CHECKPOINT
        return path if path.exists() else None
    return checkpoint_path(str(resume))


def run_dir_of(resume: str | None, default: str) -> str:
    """A run resumed from a checkpoint continues in that checkpoint's directory."""
    if resume in NO_RESUME or resume == AUTO:
        return default
    path = Path(str(resume))
    if path.is_dir():
        return str(path)
    if path.is_file():
        return str(path.parent)
    return default  # a missing path is reported by the trainer, with its name


def matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def fingerprint(flat: dict[str, Any]) -> dict[str, Any]:
    """The part of the config a checkpoint's weights and data order depend on."""
    return {k: v for k, v in flat.items() if matches(k, FIXED)}


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str] | None:
    """``("key=old, ...", "key=new, ...")`` over the keys whose values differ; None if none."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return None
    return (
        ", ".join(f"{k}={old.get(k)}" for k in keys),
        ", ".join(f"{k}={new.get(k)}" for k in keys),
    )


def check_resumable(state: dict[str, Any], flat: dict[str, Any], path: Path) -> list[str]:
    """Raise UserError if the config changes what the checkpoint was trained on.

    Returns the allowed changes as ``key: old -> new`` lines, for the log.
    """
    saved = flatten(state.get("config") or {})
    fp = fingerprint(flat)
    if not saved:  # only the hash to go by
        if state.get("fingerprint_hash") != fingerprint_hash(fp):
            raise UserError(
                f"cannot resume from {path}: it was trained with another model or data "
                f"config (its config hash differs); start a new run"
            )
        return []
    changed = differences(fingerprint(saved), fp)
    if changed:
        was, now = changed
        raise UserError(
            f"cannot resume from {path}: it was trained with {was}, this run asks for {now}; "
            f"resume with the run's own values or start a new run"
        )
    return [
        f"{k}: {saved.get(k)} -> {flat.get(k)}"
        for k in sorted(set(saved) | set(flat))
        if not matches(k, NOT_INHERITED) and saved.get(k) != flat.get(k)
    ]


def resumable_overrides(overrides: list[str]) -> list[str]:
    """The overrides a checkpoint keeps for ``resume=PATH`` to start from."""
    return [o for o in overrides if not matches(_override_key(o), NOT_INHERITED)]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_inherited_overrides(args: list[str]) -> list[str]:
    """Command-line arguments with ``resume=PATH``'s saved overrides put in front.

    Keys given on this command line win; a sweep (``-m``) inherits nothing
    (its jobs resume with ``resume=auto``).
    """
    if "-m" in args or "--multirun" in args:
        return args
    at = [i for i, a in enumerate(args) if a.startswith("resume=")]
    if not at or args[at[-1]].split("=", 1)[1] in (*NO_RESUME, AUTO):
        return args
    path = checkpoint_path(args[at[-1]].split("=", 1)[1])
    saved = load_checkpoint(path, mmap=True).get("overrides", [])  # only its overrides
    given = {_override_key(a) for a in args if "=" in a and not a.startswith("-")}
    inherited = [o for o in resumable_overrides(saved) if _override_key(o) not in given]
    # Overrides must stay one contiguous run of positional arguments for argparse.
    first = min(i for i, a in enumerate(args) if "=" in a and not a.startswith("-"))
    return args[:first] + inherited + args[first:]
