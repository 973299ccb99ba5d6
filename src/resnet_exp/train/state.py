"""A training run's state: who owns it, how it goes into ``last.pt`` and comes back.

The owners (model, optimizer, schedule, grad scaler, loader, global RNG, running
metrics) each keep a ``state_dict``; ``RunState`` puts them side by side in one
checkpoint after each epoch (and at a stop) and hands them back on a resume, so a
resumed run computes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import logging
from typing import Any

from resnet_exp.run import distributed, moves
from resnet_exp.run.checkpoint import CHECKPOINT, Checkpoint
from resnet_exp.run.moves import Place
from resnet_exp.run.resume import Resume, Stateful
from resnet_exp.run.runtime import GlobalRNG
from resnet_exp.train.metrics import RunClock, RunningMetrics
from resnet_exp.train.setup import Setup
from resnet_exp.version import __version__

log = logging.getLogger("resnet_exp")


class RunState:
    """The owners of one run's state and its checkpoint; only rank 0 writes."""

    def __init__(
        self, s: Setup, metrics: RunningMetrics, clock: RunClock, config: dict[str, Any]
    ) -> None:
        self.s, self.metrics, self.clock = s, metrics, clock
        self.config = config  # the run's config as a nested dict, kept in every checkpoint
        self.path = s.ctx.run_dir / CHECKPOINT
        self.saved_at: int | None = None  # the step of the last checkpoint written or resumed

    def shared(self) -> dict[str, Stateful]:
        """Owners whose state is the same on every rank."""
        s = self.s
        owners: dict[str, Stateful] = {
            "model": s.model,
            "optimizer": s.optimizer,
            "scheduler": s.scheduler,
            "scaler": s.scaler,
            "clock": self.clock,
            "mlflow_run_id": s.ctx.tracking,  # a str (or None): a resume continues that run
        }
        if s.ema is not None:  # trainer.ema: the averaged weights and buffers, the update count
            owners["ema"] = s.ema
        return owners

    def per_rank(self) -> dict[str, Stateful]:
        """Owners whose state differs between ranks: data position, RNG, running sums."""
        owners = {"loader": self.s.loader, "rng": GlobalRNG(), "metrics": self.metrics}
        ema = self.s.ema
        if ema is not None and self.s.ctx.world.enabled:  # each rank's averaged BN statistics
            owners["ema_buffers"] = ema.buffers
        return owners

    def save(self, step: int) -> None:
        """The owners' state dicts side by side, with what a resume checks them against."""
        self.saved_at = step
        own = {name: owner.state_dict() for name, owner in self.per_rank().items()}
        ranks = distributed.gather_to_main(own)
        world = self.s.ctx.world
        if not world.is_main:
            return
        shared = {name: owner.state_dict() for name, owner in self.shared().items()}
        Checkpoint.of_run(
            self.path,
            {**shared, **own},
            step=step,
            world=world.world,
            ranks=ranks if world.enabled else None,
            config=self.config,
            overrides=list(self.s.ctx.overrides),
            made_on={**self.here().as_dict(), "resnet_exp": __version__},
        ).save()

    def restore(self, resume: Resume) -> None:
        """Each owner's state from ``resume``'s checkpoint: this rank's own part of it, for
        this run's device (run/moves.py: the optimizer's kernel flags, a grad scaler's
        state only where this run scales, generators of another device re-derived)."""
        s, world = self.s, self.s.ctx.world
        states = resume.states(world.rank, world.world, tuple(self.per_rank()))
        states["optimizer"] = moves.for_device(states["optimizer"], s.optimizer.defaults)
        if s.scaler.is_enabled() != bool(states.get("scaler")):
            states.pop("scaler", None)  # fp16 on one side only: this run's scale starts afresh
        resume.apply({**self.shared(), **self.per_rank()}, states)
        self.saved_at = resume.step

    def here(self) -> Place:
        """Where this run trains, as its checkpoints record it."""
        ctx = self.s.ctx
        return Place(ctx.device.type, ctx.world.world, ctx.precision.value)
