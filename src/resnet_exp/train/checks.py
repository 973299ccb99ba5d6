"""Every setting checked in one pass, before any data is loaded or anything is built.

Each check is the one its owner keeps (the net's in ``models``, the optimizer's
and the schedule's in ``optim.py``); a bad value would otherwise surface after the
data set is decoded and the model built, or as a ZeroDivisionError mid-run.
"""

from __future__ import annotations

from resnet_exp.config import Config, parse_duration
from resnet_exp.data.interface import is_streamed
from resnet_exp.errors import UserError
from resnet_exp.models import NetOptions, family_unit, resolve_family
from resnet_exp.run import distributed
from resnet_exp.train.optim import check_optimizer, check_schedule


def check_settings(cfg: Config) -> None:
    """Every setting, each by the one check that owns it; nothing is built."""
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
    check_model(cfg)
    check_optimizer(cfg.optimizer)
    check_schedule(cfg.schedule)


def check_model(cfg: Config) -> None:
    """The net ``build_model`` would build: depth, unit, options, shortcut, width."""
    family_unit(resolve_family(cfg.model.family, is_streamed(cfg.data)), cfg.depth, cfg.model.unit)
    NetOptions.of(cfg.model)
    cfg.model.shortcut.check()
    if cfg.model.width is not None and cfg.model.width < 1:
        raise UserError(f"model.width={cfg.model.width} must be at least 1")
    check_bn_group(cfg)


def check_bn_group(cfg: Config) -> None:
    """Ghost batch norm needs the per-process batch to split into whole groups."""
    group = cfg.model.bn_group
    if group is None:
        return
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
