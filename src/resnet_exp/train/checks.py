"""Checks of settings that are used only late in a run, done before any data is loaded.

A bad learning rate or logging interval would otherwise surface after the
data set is decoded and the model built, or as a ZeroDivisionError mid-run.
"""

from __future__ import annotations

from torch import nn

from resnet_exp.config import Config, parse_duration
from resnet_exp.errors import UserError
from resnet_exp.train import distributed
from resnet_exp.train.optim import build_optimizer, build_scheduler, warmup_on


def check_settings(cfg: Config) -> None:
    t = cfg.trainer
    for key in ("log_every", "eval_every"):
        value = getattr(t, key)
        if value < 1:
            raise UserError(f"trainer.{key}={value} must be at least 1")
    parse_duration(t.time_limit)  # 90s, 25m, 2h or seconds
    if t.max_steps is not None and t.max_steps < 1:
        raise UserError(f"trainer.max_steps={t.max_steps} must be at least 1 (or null)")
    if t.max_steps is None and t.epochs < 1:
        raise UserError(f"trainer.epochs={t.epochs} must be at least 1")
    if cfg.model.width is not None and cfg.model.width < 1:
        raise UserError(f"model.width={cfg.model.width} must be at least 1")
    check_bn_group(cfg)
    sch = cfg.schedule
    if not 0 <= sch.warmup_factor <= 1:
        raise UserError(f"schedule.warmup_factor={sch.warmup_factor} must be in [0, 1]")
    if not sch.gamma > 0:
        raise UserError(f"schedule.gamma={sch.gamma} must be positive")
    # The optimizer and the schedule check their own settings when built: build
    # them on a stand-in parameter now. torch's own messages name the value.
    try:
        opt = build_optimizer(nn.Linear(1, 1), cfg.optimizer)
        build_scheduler(opt, sch, 10**6, warmup_on(sch, cfg.data.name), steps_per_epoch=1)
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"optimizer/schedule settings rejected by torch: {e}") from e


def check_bn_group(cfg: Config) -> None:
    """Ghost batch norm needs the per-process batch to split into whole groups."""
    group = cfg.model.bn_group
    if group is None:
        return
    if group < 1:
        raise UserError(f"model.bn_group={group} must be at least 1 (or null: the whole batch)")
    if cfg.trainer.sync_bn:
        raise UserError(
            f"model.bn_group={group} and trainer.sync_bn=true contradict each other "
            "(statistics per group vs over all processes); set one"
        )
    local = cfg.data.batch_size // distributed.current().world
    if local > group and local % group:
        raise UserError(
            f"model.bn_group={group} does not divide the per-process batch of {local} images; "
            "use a divisor of it (or null)"
        )
