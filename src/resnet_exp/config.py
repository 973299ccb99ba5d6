"""The config schema: dataclasses registered with Hydra's ConfigStore.

The YAML files under ``configs/`` fill these in; OmegaConf checks every value
against the types here (an enum field rejects a value it does not list), so a
typo in an override fails before anything is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore

from resnet_exp.models.units import OrderingName
from resnet_exp.models.variants import ShortcutSpec


class Unit(str, Enum):
    auto = "auto"
    basic = "basic"
    bottleneck = "bottleneck"
    single = "single"


class Downsample(str, Enum):
    auto = "auto"
    A = "A"  # zero-padding identity
    B = "B"  # strided 1x1 projection


class Family(str, Enum):
    auto = "auto"  # imagenet for streamed data, cifar otherwise
    cifar = "cifar"  # 3x3 stem, three stages (the paper's CIFAR nets)
    imagenet = "imagenet"  # 7x7 stem and max-pool, four stages (depths 18-200)


class Decode(str, Enum):
    auto = "auto"  # device on CUDA, workers otherwise
    workers = "workers"  # decode and augment in DataLoader worker processes
    device = "device"  # decode (nvjpeg on CUDA) and augment on the training device


class BadImage(str, Enum):
    fail = "fail"  # stop with the file's name
    skip = "skip"  # log it, count it in summary.json and go on without it


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Mode(str, Enum):
    train = "train"
    diagnose = "diagnose"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet-exp")


@dataclass
class ModelConfig:
    block: OrderingName = OrderingName.preact  # set by the `block` group
    unit: Unit = Unit.auto  # auto: basic for 6n+2 depths, bottleneck for 164/1001 and 9n+2
    downsample: Downsample = Downsample.auto  # auto: A for basic, B for bottleneck units
    family: Family = Family.auto  # auto: imagenet for streamed data (dataset=imagenet), else cifar
    width: int | None = None  # stem width (stages double it); null: 16 CIFAR, 64 ImageNet
    checkpointing: int = 0  # activation-checkpoint segments (0: off)
    shortcut: ShortcutSpec = field(default_factory=ShortcutSpec)  # set by the `shortcut` group


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "data"  # configs/config.yaml: ${oc.env:RESNET_EXP_DATA,data}
    download: bool = True
    batch_size: int = 128
    eval_batch_size: int = 1000
    train_limit: int | None = None  # use only this many training images
    test_limit: int | None = None  # evaluate on only this many test images
    val_size: int = 0  # hold out this many training images (e.g. 5000) as a validation set
    image_size: int = 32  # imagefolder images are resized (shorter side) and center-cropped to this
    augment: bool = True  # pad-4 random crop + horizontal flip
    pad: int = 4
    num_classes: int | None = None  # synthetic only; real data sets count their classes
    synthetic_train: int = 5000
    synthetic_test: int = 1000
    cache_dir: str = field(default_factory=lambda: default_cache_dir())  # "" turns the cache off
    # Streamed data (dataset=imagenet, or imagefolder with stream=true): images are
    # read from disk per batch; data.image_size is the training crop.
    stream: bool = False  # imagefolder: stream from disk instead of decoding all into memory
    eval_crops: list[int] = field(default_factory=list)  # streamed: test crops; []: image_size
    eval_crop_ratio: float = 0.875  # streamed: crop / resized shorter side (224 of 256)
    workers: int | None = None  # streamed: DataLoader workers per process; null: CPUs / processes
    decode: Decode = Decode.auto
    bad_images: BadImage = BadImage.fail  # streamed: what an undecodable image does


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    name: str = "paper"  # paper (step decay) | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    gamma: float = 0.1
    warmup: str = "auto"  # auto | true | false; auto follows the paper (see train/schedule.py)
    warmup_steps: int = 400
    warmup_factor: float = 0.1  # warm-up lr = factor * lr (0.01 for lr 0.1)
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainerConfig:
    epochs: int = 164  # 164 x 390 steps ~ the paper's 64k iterations at batch 128
    max_steps: int | None = None  # overrides epochs
    precision: Precision = Precision.auto
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    cuda_graphs: str = "auto"  # auto | true | false: replay the whole step as one CUDA graph
    deterministic: bool = False
    sync_bn: bool = False  # data-parallel runs: batch norm statistics over all ranks (CUDA)
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    log_every: int = 50  # steps between train-loss points in TensorBoard and the progress bar
    progress: bool = True
    log_gradflow_every: int = 0  # steps between per-unit gradient norms in TensorBoard (0: off)


@dataclass
class DiagnoseConfig:
    batch_size: int = 32  # images in the measured batch (its batch-norm statistics are used)


@dataclass
class ScaleConfig:
    """How large the paper presets run (the `scale` group, used by configs/experiment/*).

    A preset names the paper's nets; the scale says which depth stands for each:
    the nets themselves at `full`, small stand-ins at `short`.
    """

    name: str = "full"
    resnet110: int = 110
    resnet164: int = 164
    resnet1001: int = 1001


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    depth: int = 110
    seed: int = 0
    resume: str | None = (
        None  # a checkpoint, a run directory, or `auto` (this run's last.pt if any)
    )
    dry_run: bool = False
    mode: Mode = Mode.train


def linear_lr(lr: float, batch: int, global_batch: int) -> float:
    """``${linear_lr:0.1,256,${data.batch_size}}``: a learning rate set for ``batch``,
    scaled linearly to the run's global batch."""
    return float(lr) * int(global_batch) / int(batch)


def register_configs() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("linear_lr", linear_lr, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
