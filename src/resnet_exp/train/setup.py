"""One builder from the config: device, precision, seed, data, model, loader, optimizer,
schedule and step. The trainer, ``mode=diagnose``, ``scripts/benchmark.py`` and the
GPU tests all start from it, so what they measure is what a run trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from resnet_exp.config import Config, TrainerConfig, model_options
from resnet_exp.data import DataSource, Placement, TrainBatches, is_streamed, load_dataset
from resnet_exp.errors import UserError
from resnet_exp.models import ResNet, build_model, count_params, family_unit, resolve_family
from resnet_exp.run import distributed
from resnet_exp.run.runtime import (
    pick_channels_last,
    pick_device,
    pick_precision,
    seed_everything,
)
from resnet_exp.train.checks import check_settings
from resnet_exp.train.optim import build_optimizer, build_scheduler, warmup_on
from resnet_exp.train.step import CudaGraphStep, EagerStep, make_train_step


@dataclass(kw_only=True)
class Setup:
    """Everything built before the first step."""

    cfg: Config
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool  # trainer.channels_last, unless the CPU cannot train the net so
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
    info: dict[str, Any] = field(default_factory=dict)  # what a dry run prints


def model_from_config(cfg: Config, num_classes: int) -> ResNet:
    """The net ``cfg.model`` and ``cfg.depth`` describe (CIFAR or ImageNet family)."""
    family = resolve_family(cfg.model.family.value, is_streamed(cfg.data))
    unit = family_unit(family, cfg.depth, cfg.model.unit.value)
    return build_model(
        cfg.model.block.value,
        cfg.depth,
        num_classes,
        unit,
        cfg.model.downsample.value,
        cfg.model.width,
        cfg.model.checkpointing,
        shortcut=cfg.model.shortcut,
        family=family,
        **model_options(cfg.model),
    )


def build_setup(cfg: Config, *, diagnose: bool = False) -> Setup:
    """Check the settings (before any data is loaded), then build the run.

    ``diagnose=True``: the batch is ``diagnose.batch_size`` and everything runs in
    fp32 (tiny gradients at the far end of a deep net must not round away).
    """
    dist = distributed.current()
    device = pick_device(cfg.trainer.device, dist.local_rank if dist.enabled else None)
    precision = "fp32" if diagnose else pick_precision(cfg.trainer.precision.value, device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    family = resolve_family(cfg.model.family.value, is_streamed(cfg.data))
    unit = family_unit(family, cfg.depth, cfg.model.unit.value)  # a bad depth fails first
    check_settings(cfg)
    key, batch = ("diagnose.batch_size", cfg.diagnose.batch_size)
    if not diagnose:
        key, batch = "data.batch_size", cfg.data.batch_size
    _check_batches(cfg, key, batch, 2 if diagnose else 1, dist.world, device)

    data = load_dataset(cfg.data)
    if batch > len(data.train):
        raise UserError(f"{key}={batch} is larger than the {len(data.train)} training images")
    model = model_from_config(cfg, data.num_classes)
    params = count_params(model)
    channels_last = pick_channels_last(cfg.trainer.channels_last, model, device)
    model, train_model = _place(model, cfg.trainer, device, dist.enabled, channels_last)
    # In memory or streamed from files: the data set's own loader.
    at = Placement(device, channels_last, dist.rank, dist.world)
    loader = data.train_loader(cfg.data, batch // dist.world, cfg.seed, at)
    total = _total_steps(cfg.trainer, loader.steps_per_epoch)
    warmup = warmup_on(cfg.schedule, cfg.data.name)
    optimizer = build_optimizer(model, cfg.optimizer, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, cfg.schedule, total, warmup, loader.steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    t = cfg.trainer
    train_step = make_train_step(
        train_model,
        optimizer,
        scaler,
        device,
        precision,
        t.compile,
        t.compile_mode,
        t.cuda_graphs,
        hooks=t.log_gradflow_every > 0,
    )
    s = Setup(
        cfg=cfg,
        device=device,
        precision=precision,
        channels_last=channels_last,
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
    )
    s.info = _info(s, family, unit, params, batch, dist.world)
    return s


def _place(
    model: nn.Module,
    t: TrainerConfig,
    device: torch.device,
    data_parallel: bool,
    channels_last: bool,
) -> tuple[nn.Module, nn.Module]:
    """The net on its device and memory format, and what the step calls (DDP around it)."""
    fmt = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(device, memory_format=fmt)
    if not data_parallel:
        return model, model
    if t.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Every rank starts from rank 0's weights (DDP broadcasts them) and
    # keeps BN running statistics in step with rank 0's (broadcast_buffers).
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    return model, ddp


def _total_steps(t: TrainerConfig, steps_per_epoch: int) -> int:
    """The run's length in steps (trainer.epochs and max_steps are checked in train/checks.py)."""
    return t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch


def _info(s: Setup, family: str, unit: str, params: int, batch: int, world: int) -> dict[str, Any]:
    """What a dry run prints."""
    cfg = s.cfg
    return {
        "block": cfg.model.block.value,
        "depth": cfg.depth,
        "family": family,
        "unit": unit,
        "shortcut": cfg.model.shortcut.describe(),
        "params": params,
        "dataset": cfg.data.name,
        "data_source": s.data.source,
        "train_images": len(s.data.train),
        f"{s.data.eval_name}_images": len(s.data.eval_split),
        "data_mean": list(s.data.mean),  # the input normalisation (per channel, in [0, 1]
        "data_std": list(s.data.std),  # units): what an exported net expects (run/export.py)
        "optimizer": cfg.optimizer.name.value,
        "schedule": cfg.schedule.name.value,
        "device": str(s.device),
        "precision": s.precision,
        "precision_requested": cfg.trainer.precision.value,
        "channels_last": s.channels_last,
        "seed": cfg.seed,
        "processes": world,
        "steps": s.total_steps,
        "steps_per_epoch": s.loader.steps_per_epoch,
        "batch_size": batch,
        "warmup": s.warmup,
    }


def _check_batches(
    cfg: Config, key: str, batch: int, least: int, world: int, device: torch.device
) -> None:
    if batch < least:
        raise UserError(f"{key}={batch} must be at least {least}")
    if cfg.data.eval_batch_size < 1:
        raise UserError(f"data.eval_batch_size={cfg.data.eval_batch_size} must be at least 1")
    # data.batch_size is the global batch (the paper's 128), split over the ranks:
    # the recipe, lr included, is the same on any number of GPUs.
    if batch % world:
        raise UserError(
            f"{key}={batch} does not split evenly over {world} processes; use a multiple of {world}"
        )
    if cfg.trainer.sync_bn and device.type != "cuda":
        raise UserError(
            "trainer.sync_bn=true needs CUDA GPUs (SyncBatchNorm); on CPUs leave it off"
        )
