"""Every setting checked in one pass, before any data is loaded or anything is built.

Each check is the one its owner keeps (the net's in ``models.NetSpec``, the
optimizer's and the schedule's in ``optim.py``); a bad value would otherwise surface
after the data set is decoded and the model built, or as a ZeroDivisionError mid-run.
"""

from __future__ import annotations

from resnet_exp.config import Config, Mode, parse_duration
from resnet_exp.data.batch_aug import check_batch_aug
from resnet_exp.errors import UserError
from resnet_exp.run.distributed import DistInfo
from resnet_exp.run.tracking import check_tracking
from resnet_exp.train.ema import check_ema
from resnet_exp.train.optim import check_optimizer, check_schedule


def check_settings(cfg: Config, world: DistInfo) -> None:
    """Every setting but the net's (``NetSpec`` checks those), each by the check that owns it."""
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
    if cfg.eval.recalibrate_bn < 0:
        raise UserError(
            f"eval.recalibrate_bn={cfg.eval.recalibrate_bn} must be 0 (off) or a number of "
            "training batches"
        )
    if not 0 <= t.label_smoothing < 1:
        raise UserError(f"trainer.label_smoothing={t.label_smoothing} must be in [0, 1) (0: off)")
    check_ema(t.ema)
    check_batch_aug(cfg.data)
    check_optimizer(cfg.optimizer)
    check_schedule(cfg.schedule)
    check_batches(cfg, world)
    check_bn_group(cfg, world)
    check_tracking(cfg)
    check_signal(cfg, world)


def batch_of(cfg: Config) -> tuple[str, int]:
    """The key and size of the run's batch: the training batch, or the measured one
    of ``mode=diagnose``."""
    if cfg.mode is Mode.diagnose:
        return "diagnose.batch_size", cfg.diagnose.batch_size
    return "data.batch_size", cfg.data.batch_size


def check_batches(cfg: Config, world: DistInfo) -> None:
    key, batch = batch_of(cfg)
    least = 2 if cfg.mode is Mode.diagnose else 1  # batch statistics need two images
    if batch < least:
        raise UserError(f"{key}={batch} must be at least {least}")
    if cfg.data.eval_batch_size < 1:
        raise UserError(f"data.eval_batch_size={cfg.data.eval_batch_size} must be at least 1")
    # data.batch_size is the global batch (the paper's 128), split over the ranks:
    # the recipe, lr included, is the same on any number of GPUs.
    if batch % world.world:
        raise UserError(
            f"{key}={batch} does not split evenly over {world.world} processes; "
            f"use a multiple of {world.world}"
        )


def check_signal(cfg: Config, world: DistInfo) -> None:
    """trainer.track_signal_every, and the batch it measures (mode=diagnose's)."""
    every = cfg.trainer.track_signal_every
    if every < 0:
        raise UserError(
            f"trainer.track_signal_every={every} must be 0 (off) or a positive step count"
        )
    batch = cfg.diagnose.batch_size
    if every and cfg.mode is Mode.train and (batch < 2 or batch % world.world):
        raise UserError(
            f"diagnose.batch_size={batch} (the batch trainer.track_signal_every measures) "
            f"must be at least 2 and a multiple of the {world.world} processes"
        )


def check_bn_group(cfg: Config, world: DistInfo) -> None:
    """Ghost batch norm needs the per-process batch to split into whole groups."""
    group = cfg.model.bn_group
    if group is None:
        return
    if cfg.trainer.sync_bn:
        raise UserError(
            f"model.bn_group={group} and trainer.sync_bn=true contradict each other "
            "(statistics per group vs over all processes); set one"
        )
    local = cfg.data.batch_size // world.world
    if local > group and local % group:
        raise UserError(
            f"model.bn_group={group} does not divide the per-process batch of {local} images; "
            "use a divisor of it (or null)"
        )
