"""What a run is given, worked out once and passed down.

The command (``cli.run_job``) reads Hydra's job state (the run folder, the overrides,
whether the job is a search's trial), the process group and the machine once, and
hands a ``RunContext`` to the trainer, ``mode=eval`` and ``mode=diagnose``. Below it
nothing reads Hydra's global config or asks the process group again, and the net's family
and unit, the device, the precision and the memory format are decided here alone
(``resolve``), before any data is loaded; the layers take the enums as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch

from resnet_exp.config import Config, Mode, Precision, config_tree, flatten, parse_duration
from resnet_exp.data import Placement, is_streamed
from resnet_exp.errors import UserError
from resnet_exp.models import NetSpec
from resnet_exp.run.distributed import ONE_PROCESS, DistInfo
from resnet_exp.run.moves import Place
from resnet_exp.run.resume import Resume
from resnet_exp.run.runtime import pick_channels_last, pick_device, pick_precision
from resnet_exp.run.stop import StopRequest
from resnet_exp.run.tracking import Tracking
from resnet_exp.train.checks import check_settings
from resnet_exp.train.init_from import InitWeights

log = logging.getLogger("resnet_exp")


class EvaluationReporter(Protocol):
    """What the trainer tells after each scheduled evaluation, and whether it should stop
    there: a search's pruner (sweep/search/study.py builds one for a trial; the trainer
    knows only this protocol). In a data-parallel run rank 0 decides for all."""

    def should_stop(self, epoch: int, val_error: float) -> bool:
        """Take ``epoch``'s (1-based) validation error; True: the run stops after it."""
        ...


@dataclass(frozen=True)
class RunContext:
    """One run's folder, processes, stop flag and the machine's decisions."""

    run_dir: Path
    net: NetSpec
    device: torch.device
    precision: Precision  # bf16 | fp16 | fp32: never auto
    channels_last: bool  # trainer.channels_last, unless the CPU cannot train the net so
    world: DistInfo = ONE_PROCESS
    stop: StopRequest = field(default_factory=StopRequest)
    time_limit_s: float | None = None  # trainer.time_limit, counted from ``stop.started``
    # The checkpoint the run continues (resume=) or mode=eval evaluates, loaded and checked.
    resume: Resume | None = None
    overrides: tuple[str, ...] = ()  # the command line's, kept in the checkpoint (resume=PATH)
    pruning: EvaluationReporter | None = None  # a search's trial: its study's pruner
    # TensorBoard, MLflow (logger=...); the MLflow run id, kept in the checkpoint
    tracking: Tracking = field(default_factory=Tracking)
    config: dict[str, Any] = field(default_factory=dict)  # config_tree: what a checkpoint keeps
    init: InitWeights | None = None  # init_from='s weights, read; a new training run's only

    @cached_property
    def flat(self) -> dict[str, Any]:
        """The config as dotted keys (``model.block``): what a resume is checked against."""
        return flatten(self.config)

    @property
    def placement(self) -> Placement:
        """Where this rank's batches go: device, memory format, share of the images."""
        return Placement(self.device, self.channels_last, self.world.rank, self.world.world)


def check(cfg: Config, world: DistInfo = ONE_PROCESS) -> NetSpec:
    """Every setting that needs neither data nor a device, checked in one pass; the net
    they describe. A bad value is a one-line UserError."""
    net = NetSpec.from_config(cfg.model, cfg.depth, is_streamed(cfg.data))  # a bad depth first
    check_settings(cfg, world)
    return net


def resolve(
    cfg: Config,
    run_dir: Path,
    *,
    world: DistInfo = ONE_PROCESS,
    stop: StopRequest | None = None,
    overrides: tuple[str, ...] = (),
    pruning: EvaluationReporter | None = None,
    tracking: Tracking | None = None,
) -> RunContext:
    """The run's context: the settings checked, the net, device, precision and memory
    format decided (a GPU claimed when several are visible and the device is ``auto``),
    and the checkpoint it starts from loaded and checked, before any data is loaded."""
    net, device, precision = _decide(cfg, world, claim=True)
    if device.type == "cuda":  # cuda:N: streams, graphs and allocations of this process there
        torch.cuda.set_device(device)
    tree = config_tree(cfg)
    resume = _starting_point(cfg, run_dir, Place(device.type, world.world, precision.value), tree)
    return RunContext(
        run_dir=run_dir,
        net=net,
        device=device,
        precision=precision,
        channels_last=pick_channels_last(cfg.trainer.channels_last, net.layers, device),
        world=world,
        stop=stop if stop is not None else StopRequest(),
        time_limit_s=parse_duration(cfg.trainer.time_limit),
        resume=resume,
        overrides=overrides,
        pruning=pruning,
        tracking=tracking if tracking is not None else Tracking.of(cfg, run_dir),
        config=tree,
        init=_init_weights(cfg, resume),
    )


def _starting_point(cfg: Config, run_dir: Path, here: Place, tree: dict[str, Any]) -> Resume | None:
    """The checkpoint a training run continues (``resume=``; a new run never writes over
    another's, but a dry run may look) or ``mode=eval`` evaluates."""
    trust = cfg.trust_checkpoint
    if cfg.mode is Mode.eval:
        return Resume.to_evaluate(cfg.resume, flatten(tree), trust)
    if cfg.mode is Mode.train:
        return Resume.find(cfg.resume, run_dir, flatten(tree), here, cfg.dry_run, trust)
    return None


def _init_weights(cfg: Config, resume: Resume | None) -> InitWeights | None:
    """``init_from=``'s weights for a new training run (a resumed one continues its own)."""
    if cfg.mode is not Mode.train or not cfg.init_from.path:
        return None
    if resume is not None:
        log.info(
            "init_from=%s not applied: the run continues from its checkpoint", cfg.init_from.path
        )
        return None
    return InitWeights.read(cfg.init_from, cfg.trust_checkpoint)


def validate(cfg: Config, world: DistInfo = ONE_PROCESS) -> None:
    """What ``resolve`` refuses, found without building or claiming anything: the
    command asks this before it writes anything (a refused run leaves no folder)."""
    _decide(cfg, world, claim=False)


def _decide(cfg: Config, world: DistInfo, claim: bool) -> tuple[NetSpec, torch.device, Precision]:
    """The net, the device and the precision; ``mode=diagnose`` measures in fp32 (tiny
    gradients at the far end of a deep net must not round away)."""
    net = check(cfg, world)
    local_rank = world.local_rank if world.enabled else None
    device = pick_device(cfg.trainer.device, local_rank, claim=claim)
    precision = (
        Precision.fp32
        if cfg.mode is Mode.diagnose
        else pick_precision(cfg.trainer.precision, device)
    )
    if cfg.trainer.sync_bn and device.type != "cuda":
        raise UserError(
            "trainer.sync_bn=true needs CUDA GPUs (SyncBatchNorm); on CPUs leave it off"
        )
    return net, device, precision
