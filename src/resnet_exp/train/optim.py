"""Optimizers and learning-rate schedules (torch's own; the schedule steps once per iteration)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from resnet_exp.config import OptimizerConfig, OptimizerName, ScheduleConfig, ScheduleName, Switch
from resnet_exp.errors import UserError
from resnet_exp.models.options import choose

CIFAR = ("cifar10", "cifar100")

log = logging.getLogger("resnet_exp")


def check_optimizer(cfg: OptimizerConfig) -> None:
    """Every value torch's optimizers would refuse, as one line naming the setting."""
    choose(OptimizerName, cfg.name, "optimizer.name")
    if not cfg.lr > 0:
        raise UserError(f"optimizer.lr={cfg.lr} must be a positive number")
    if cfg.weight_decay < 0:
        raise UserError(f"optimizer.weight_decay={cfg.weight_decay} must be >= 0")
    if cfg.momentum < 0:
        raise UserError(f"optimizer.momentum={cfg.momentum} must be >= 0")
    if cfg.nesterov and cfg.momentum <= 0:
        raise UserError(
            f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {cfg.momentum})"
        )
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise UserError(f"optimizer.betas={list(cfg.betas)} must be two numbers in [0, 1)")


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, fused: bool = False) -> Optimizer:
    """SGD with momentum (the paper; weight decay on every parameter) or AdamW."""
    check_optimizer(cfg)
    # One fused kernel per step on a GPU, else one multi-tensor (foreach) kernel per op.
    kernel = {"fused": True} if fused else {"foreach": True}
    params = model.parameters()
    if choose(OptimizerName, cfg.name, "optimizer.name") == OptimizerName.sgd:
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
            **kernel,
        )
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernel
    )


def warmup_on(cfg: ScheduleConfig, dataset: str) -> bool:
    """``auto``: the paper's appendix warms up (lr 0.01 for 400 iterations) in all
    CIFAR experiments, pre-activation nets included although they do not need
    it; other data sets start at the full lr. fb.resnet.torch has no warm-up
    (``false``)."""
    choice = Switch.of(cfg.warmup, "schedule.warmup")
    if choice != Switch.auto:
        return choice == Switch.true
    return dataset in CIFAR


def check_schedule(cfg: ScheduleConfig) -> None:
    """Every schedule value that would fail (or mislead) later, as one line."""
    choose(ScheduleName, cfg.name, "schedule.name")
    Switch.of(cfg.warmup, "schedule.warmup")
    if not 0 <= cfg.warmup_factor <= 1:
        raise UserError(f"schedule.warmup_factor={cfg.warmup_factor} must be in [0, 1]")
    if not cfg.gamma > 0:
        raise UserError(f"schedule.gamma={cfg.gamma} must be positive")
    if cfg.warmup_steps < 0:
        raise UserError(f"schedule.warmup_steps={cfg.warmup_steps} must be >= 0")
    if getattr(cfg.milestone_unit, "value", cfg.milestone_unit) == "epoch":
        if any(m <= 0 for m in cfg.milestones):
            raise UserError(
                f"schedule.milestones={list(cfg.milestones)} must be positive epoch counts"
            )
    elif any(not 0 < m < 1 for m in cfg.milestones):
        raise UserError(
            f"schedule.milestones={list(cfg.milestones)} must be fractions of the run in (0, 1) "
            "(or set schedule.milestone_unit=epoch)"
        )


def milestone_steps(
    cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int | None
) -> list[int]:
    """The steps after which the lr drops: fractions of the run, or completed epochs."""
    unit = getattr(cfg.milestone_unit, "value", cfg.milestone_unit)
    if unit == "epoch":
        if steps_per_epoch is None:
            raise ValueError("milestones in epochs need the run's steps_per_epoch")
        steps = sorted(round(m * steps_per_epoch) for m in cfg.milestones)
        if steps and steps[-1] >= total_steps:
            log.warning(
                "schedule.milestones=%s (epochs) reach beyond the run's %d steps: "
                "some lr drops never happen",
                list(cfg.milestones),
                total_steps,
            )
        return steps
    return sorted(round(m * total_steps) for m in cfg.milestones)


def build_scheduler(
    opt: Optimizer,
    cfg: ScheduleConfig,
    total_steps: int,
    warmup: bool,
    steps_per_epoch: int | None = None,
) -> LRScheduler:
    """Per-step schedule; ``steps_per_epoch`` places milestones given in epochs."""
    check_schedule(cfg)
    warm = min(cfg.warmup_steps, total_steps) if warmup else 0
    name = choose(ScheduleName, cfg.name, "schedule.name")
    if name == ScheduleName.paper:
        milestones = milestone_steps(cfg, total_steps, steps_per_epoch)
        main = MultiStepLR(opt, milestones=milestones, gamma=cfg.gamma)
        if not warm:
            return main
        # Multiplicative factors compose: x0.1 until `warm`, then the step decay.
        return ChainedScheduler([ConstantLR(opt, factor=cfg.warmup_factor, total_iters=warm), main])
    if not warm:
        return CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.min_lr)
    return SequentialLR(
        opt,
        [
            ConstantLR(opt, factor=cfg.warmup_factor, total_iters=warm),
            CosineAnnealingLR(opt, T_max=max(1, total_steps - warm), eta_min=cfg.min_lr),
        ],
        milestones=[warm],
    )
