"""Resuming, in one place: which checkpoint, whether this config may continue it,
and handing its state to the run's owners.

A checkpoint (run/checkpoint.py) stores the run's full config and the
overrides it was started with. ``resume=PATH`` reuses those overrides (so
``resnet-exp resume=DIR`` alone continues the run as it was), and overrides
given with it take precedence: a longer run or another logging interval is
allowed and logged; another model, data set, batch or seed is refused with the
keys that differ (the checkpoint's one match rule, with nothing allowed).

``Resume.find`` loads and checks a checkpoint once, before any data is loaded;
the trainer then calls ``apply`` with its state owners.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from resnet_exp.errors import UserError
from resnet_exp.run import moves
from resnet_exp.run.checkpoint import AUTO, CHECKPOINT, NO_RESUME, TRAINING, Checkpoint, matches
from resnet_exp.run.moves import Place

log = logging.getLogger("resnet_exp")

# How to run, not what: never compared, never inherited.
NOT_INHERITED = (
    "resume",
    "dry_run",
    "trust_checkpoint",
    "init_from",
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra.output_subdir",
)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any, /) -> Any: ...


@dataclass
class Resume:
    """A loaded, checked checkpoint to continue from."""

    checkpoint: Checkpoint
    changes: list[str]  # allowed config changes, ``key: old -> new``
    move: str | None = None  # what differs from where it was made (run/moves.py), for the log

    @classmethod
    def find(
        cls,
        resume: str | None,
        run_dir: Path,
        flat: dict[str, Any],
        here: Place,
        fresh_ok: bool,
        trust: bool = False,
    ) -> Resume | None:
        """The checkpoint ``resume`` names, loaded and checked against this config and
        for the move to ``here``; None for a new run. ``fresh_ok=False`` refuses a new
        run over an existing one."""
        path = Checkpoint.resolve(resume, run_dir)
        if path is None:
            if not fresh_ok and (run_dir / CHECKPOINT).exists():
                raise UserError(
                    f"{run_dir} already holds a run ({CHECKPOINT}); continue it with "
                    f"resume={run_dir} (or resume=auto), or pass another hydra.run.dir"
                )
            return None
        ckpt = Checkpoint.load(path, trust=trust)
        changes = check_resumable(ckpt.state, flat, path)
        _, move = moves.describe(Place.of(ckpt.made_on, ckpt.world), here, ckpt.world)
        return cls(ckpt, changes, move)

    def states(self, rank: int, world: int, per_rank: tuple[str, ...]) -> dict[str, Any]:
        """Each owner's state for ``rank`` of ``world`` processes: the shared ones as
        saved, the per-rank ones (``per_rank``: data position, RNG, running sums) this
        rank's own, regrouped when the run was saved by another number of processes."""
        state = self.checkpoint.state
        saved = state.get("ranks") or [{k: state[k] for k in per_rank if k in state}]
        return {**state, **moves.regroup(saved, world)[rank]}

    @classmethod
    def to_evaluate(cls, resume: str | None, flat: dict[str, Any], trust: bool = False) -> Resume:
        """``resume=``'s checkpoint for ``mode=eval``, checked against this config: an
        evaluation trains nothing, so only the keys of how the net was trained
        (``TRAINING``) may differ."""
        if resume in NO_RESUME:
            raise UserError("mode=eval needs resume=RUN_DIR (a run directory or its last.pt)")
        ckpt = Checkpoint.load(Checkpoint.path_of(str(resume)), trust=trust)
        ckpt.check_config(
            flat,
            doing="evaluate",
            asker="this command",
            hint="drop those overrides (the run's own settings come from its checkpoint)",
            allow=TRAINING,
        )
        return cls(ckpt, [])

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def step(self) -> int:
        return self.checkpoint.step

    def check_length(self, total_steps: int) -> None:
        if self.step > total_steps:
            raise UserError(
                f"{self.path} is at step {self.step}, past this run's {total_steps} steps; "
                f"pass a larger trainer.max_steps or trainer.epochs"
            )

    def apply(self, owners: dict[str, Stateful], states: dict[str, Any]) -> None:
        """Load each owner's state from ``states`` (``Resume.states``) and say what the
        resume changes."""
        for name, owner in owners.items():
            if name in states:  # older checkpoints hold no running metrics
                owner.load_state_dict(states[name])
        if self.move is not None:
            log.info("%s", self.move)
        for change in self.changes:
            log.info("resuming with a changed setting: %s", change)
        if any(c.startswith(("trainer.epochs", "trainer.max_steps")) for c in self.changes):
            log.info(
                "the learning-rate schedule continues as saved (milestones of the original length)"
            )


def check_resumable(state: dict[str, Any], flat: dict[str, Any], path: Path) -> list[str]:
    """Raise UserError if the config changes what the checkpoint was trained on (a
    resume allows no matched key to differ: run/checkpoint.py).

    Returns the allowed changes as ``key: old -> new`` lines, for the log.
    """
    ckpt = Checkpoint(path, state)
    ckpt.check_config(
        flat,
        doing="resume from",
        asker="this run",
        hint="resume with the run's own values or start a new run",
    )
    return ckpt.changes(flat, ignore=NOT_INHERITED)


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
    path = Checkpoint.path_of(args[at[-1]].split("=", 1)[1])
    trust = any(a.lower() in ("trust_checkpoint=true", "trust_checkpoint=1") for a in args)
    saved = Checkpoint.load(path, mmap=True, trust=trust).overrides  # only its overrides
    given = {_override_key(a) for a in args if "=" in a and not a.startswith("-")}
    inherited = [o for o in resumable_overrides(saved) if _override_key(o) not in given]
    # Overrides must stay one contiguous run of positional arguments for argparse.
    first = min(i for i, a in enumerate(args) if "=" in a and not a.startswith("-"))
    return args[:first] + inherited + args[first:]
