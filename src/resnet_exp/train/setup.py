"""What a run builds from its config and context: data, net, loader, optimizer, schedule
and step. The trainer, ``mode=eval``, ``mode=diagnose``, ``scripts/benchmark.py`` and
the GPU tests all start here, so what they measure is what a run trains; each mode
builds only what it uses (``prepare``: data and net; ``build_setup``: the rest too)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from resnet_exp.config import Config, Precision, TrainerConfig
from resnet_exp.data import DataSource, TrainBatches, load_dataset
from resnet_exp.data.batch_aug import BatchAugment
from resnet_exp.errors import UserError
from resnet_exp.models import count_params
from resnet_exp.run.runtime import allow_tf32, seed_everything
from resnet_exp.train.checks import batch_of
from resnet_exp.train.context import RunContext
from resnet_exp.train.ema import WeightAverage
from resnet_exp.train.optim import build_optimizer, build_scheduler, warmup_on
from resnet_exp.train.step import CudaGraphStep, EagerStep, make_train_step

log = logging.getLogger("resnet_exp")


@dataclass(kw_only=True)
class Setup:
    """Everything a training run builds before its first step (and what it was built from)."""

    cfg: Config
    ctx: RunContext
    data: DataSource  # in memory or streamed: its loaders hide which
    model: nn.Module  # the network itself (checkpoints, evaluation)
    train_model: nn.Module  # what the step calls: the network, or DDP around it
    loader: TrainBatches
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    train_step: EagerStep | CudaGraphStep
    total_steps: int
    warmup: bool
    ema: WeightAverage | None = None  # trainer.ema: the averaged weights, evaluated beside
    info: dict[str, Any] = field(default_factory=dict)  # what a dry run prints

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def precision(self) -> Precision:
        return self.ctx.precision


def prepare(cfg: Config, ctx: RunContext) -> tuple[DataSource, nn.Module]:
    """The run's data and its freshly initialised net on the run's device, seeded as
    training seeds them (so ``mode=diagnose`` sees the net and batch training would)."""
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    allow_tf32(cfg.trainer.tf32)
    data = load_dataset(cfg.data)
    key, batch = batch_of(cfg)
    if batch > len(data.train):
        raise UserError(f"{key}={batch} is larger than the {len(data.train)} training images")
    fmt = torch.channels_last if ctx.channels_last else torch.preserve_format
    model = ctx.net.build(data.num_classes).to(ctx.device, memory_format=fmt)
    return data, model


def build_setup(cfg: Config, ctx: RunContext) -> Setup:
    """The whole training run, in its context (``train.context.resolve``)."""
    data, model = prepare(cfg, ctx)
    params = count_params(model)
    started = ctx.init.load_into(model) if ctx.init is not None else {}
    model, train_model = _data_parallel(model, cfg.trainer, ctx)
    _, batch = batch_of(cfg)
    loader = data.train_loader(batch // ctx.world.world, cfg.seed, ctx.placement)
    loader = BatchAugment.wrap(loader, cfg.data, data.num_classes, cfg.seed, ctx.placement)
    total = _total_steps(cfg.trainer, loader.steps_per_epoch)
    warmup = warmup_on(cfg.schedule, cfg.data.name)
    optimizer = build_optimizer(model, cfg.optimizer, fused=ctx.device.type == "cuda")
    scheduler = build_scheduler(optimizer, cfg.schedule, total, warmup, loader.steps_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision is Precision.fp16)
    t = cfg.trainer
    train_step = make_train_step(
        train_model,
        optimizer,
        scaler,
        ctx,
        t.compile,
        t.compile_mode,
        t.cuda_graphs,
        hooks=t.log_gradflow_every > 0,
        label_smoothing=t.label_smoothing,
    )
    s = Setup(
        cfg=cfg,
        ctx=ctx,
        data=data,
        model=model,
        train_model=train_model,
        loader=loader,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_step=train_step,
        total_steps=total,
        warmup=warmup,
        ema=WeightAverage.of(model, t.ema),
    )
    s.info = {**describe(cfg, ctx, data, params, batch, loader, total, warmup), **started}
    return s


def _data_parallel(
    model: nn.Module, t: TrainerConfig, ctx: RunContext
) -> tuple[nn.Module, nn.Module]:
    """The net (with synchronised batch norms if asked) and what the step calls: the
    net itself, or DDP around it in a data-parallel run."""
    if not ctx.world.enabled:
        return model, model
    if t.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Every rank starts from rank 0's weights (DDP broadcasts them) and
    # keeps BN running statistics in step with rank 0's (broadcast_buffers).
    device = ctx.device
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    return model, ddp


def _total_steps(t: TrainerConfig, steps_per_epoch: int) -> int:
    """The run's length in steps (trainer.epochs and max_steps are checked in train/checks.py)."""
    return t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch


def describe(
    cfg: Config,
    ctx: RunContext,
    data: DataSource,
    params: int,
    batch: int,
    loader: TrainBatches | None = None,
    total: int | None = None,
    warmup: bool | None = None,
) -> dict[str, Any]:
    """What a dry run prints and summary.json starts from."""
    net = ctx.net
    info: dict[str, Any] = {
        "block": net.block.value,
        "depth": net.depth,
        "family": net.family.value,
        "unit": net.unit.value,
        "shortcut": net.shortcut.describe(),
        "params": params,
        "dataset": cfg.data.name,
        "data_source": data.source,
        "train_images": len(data.train),
        f"{data.eval_name}_images": len(data.eval_split),
        "data_mean": list(data.mean),  # the input normalisation (per channel, in [0, 1]
        "data_std": list(data.std),  # units): what an exported net expects (run/export.py)
        "optimizer": cfg.optimizer.name.value,
        "schedule": cfg.schedule.name.value,
        "device": str(ctx.device),
        "precision": ctx.precision.value,
        "precision_requested": cfg.trainer.precision.value,
        "tf32": cfg.trainer.tf32,
        "channels_last": ctx.channels_last,
        "seed": cfg.seed,
        "processes": ctx.world.world,
    }
    if loader is not None:
        info.update(steps=total, steps_per_epoch=loader.steps_per_epoch)
    info["batch_size"] = batch
    if warmup is not None:
        info["warmup"] = warmup
    return info
