"""The config schema: dataclasses registered with Hydra's ConfigStore.

Every default is written here, once, with its type and a short comment. The
YAML group files under ``configs/`` set only what their choice changes
(``optimizer/adamw.yaml``: the name and AdamW's lr and weight decay). OmegaConf
checks every value against the types here (an enum field rejects a value it
does not list), so a typo in an override fails before anything is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from resnet_exp.models.options import Block, Downsample, Family, NetOptions, Unit
from resnet_exp.models.variants import ShortcutSpec


class PadValue(str, Enum):
    mean = "mean"  # normalise, then zero-pad: the border is the mean colour (fb.resnet.torch)
    zero = "zero"  # pad the raw image with black


class MilestoneUnit(str, Enum):
    fraction = "fraction"  # of the run's steps
    epoch = "epoch"  # completed epochs (fb.resnet.torch's 1-based epochs 81, 122 are 80, 121)


class Decode(str, Enum):
    auto = "auto"  # device on CUDA, workers otherwise
    workers = "workers"  # decode and augment in DataLoader worker processes
    device = "device"  # decode (nvjpeg on CUDA) and augment on the training device


class Interpolation(str, Enum):
    bicubic = "bicubic"  # fb.resnet.torch's image.scale (transforms.lua:38, 155)
    bilinear = "bilinear"  # torchvision's default, cheaper on a CPU


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
    eval = "eval"  # evaluate a trained run's checkpoint (resume=RUN_DIR), see modes/evaluate.py


class EvalSplit(str, Enum):
    auto = "auto"  # the split the run evaluated while training: val if data.val_size > 0, else test
    test = "test"
    val = "val"


class OptimizerName(str, Enum):
    sgd = "sgd"  # the paper's
    adamw = "adamw"


class ScheduleName(str, Enum):
    paper = "paper"  # step decay at fractions of the run
    cosine = "cosine"


class Switch(str, Enum):
    """auto | true | false. The fields that take it are typed ``str``: Hydra parses
    ``=true`` into a bool, which an enum field would refuse; ``Switch.of`` reads them."""

    auto = "auto"
    true = "true"
    false = "false"

    @classmethod
    def of(cls, value: Any, key: str) -> Switch:
        from resnet_exp.errors import UserError

        try:
            return cls(str(value).lower())
        except ValueError:
            raise UserError(f"{key}={value!r} is not one of auto, true, false") from None


STREAMED = "streamed"  # a setting that acts on streamed data only (data/interface.is_streamed)


def since(before: Any, acts: str | None = None) -> dict[str, Any]:
    """Field metadata of a setting added after checkpoints were written: ``before`` is the
    value that reproduces what the tool did before the setting existed (a checkpoint
    without the key is read as having it), ``acts`` when the setting acts on a run at all
    (``STREAMED``: only on streamed data; a run it does not act on never compares it)."""
    return {"since": {"before": before, "acts": acts}}


def added_settings(node: type | None = None, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every setting declared with ``since``, as dotted keys."""
    out: dict[str, dict[str, Any]] = {}
    for f in fields(node or Config):
        if "since" in f.metadata:
            out[prefix + f.name] = f.metadata["since"]
        kind = f.type if isinstance(f.type, type) else globals().get(str(f.type))
        if isinstance(kind, type) and is_dataclass(kind):
            out.update(added_settings(kind, f"{prefix}{f.name}."))
    return out


def config_dir() -> str:
    """The YAML configs: inside the package in a wheel, at the repository top otherwise.

    Resolved explicitly (not relative to the caller's directory), so the
    installed command works from anywhere, editable install or not.
    """
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(here.parents[1] / "configs")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet-exp")


@dataclass
class ModelConfig(NetOptions):
    """The net: its shape here, the fidelity options (``stride_at``, ``preact_shortcut``,
    ``bn_group``, ``bn_stats``, ``fp32_identity``) with their defaults in ``NetOptions``."""

    block: Block = Block.preact  # set by the `block` group
    unit: Unit = Unit.auto  # auto: basic for 6n+2 depths, bottleneck for 164/1001 and 9n+2
    downsample: Downsample = Downsample.auto  # auto: A for basic, B for bottleneck units
    family: Family = Family.auto  # auto: imagenet for streamed data (dataset=imagenet), else cifar
    width: int | None = None  # stem width (stages double it); null: 16 CIFAR, 64 ImageNet
    checkpointing: int = 0  # activation-checkpoint segments (0: off)
    shortcut: ShortcutSpec = field(default_factory=ShortcutSpec)  # set by the `shortcut` group


@dataclass
class DataConfig:
    # set by the `dataset` group: cifar10 | cifar100 | imagefolder | imagenet | synthetic
    name: str = "cifar10"
    root: str = "${oc.env:RESNET_EXP_DATA,data}"  # the data set's directory
    download: bool = True
    batch_size: int = 128
    eval_batch_size: int = 1000
    train_limit: int | None = None  # use only this many training images
    test_limit: int | None = None  # evaluate on only this many test images
    val_size: int = 0  # hold out this many training images (e.g. 5000) as a validation set
    image_size: int = 32  # imagefolder images are resized (shorter side) and center-cropped to this
    augment: bool = True  # pad-4 random crop + horizontal flip
    pad: int = 4
    pad_value: PadValue = PadValue.mean  # colour of the crop's padding
    # Beyond the paper (docs/fidelity.md): per-batch regularisers on the device, 0 = off
    # side (pixels) of the square set to 0 (the mean colour) in each image
    cutout: int = field(default=0, metadata=since(0))
    # mixup: pairs within the batch mixed by lambda ~ Beta(a, a)
    mixup_alpha: float = field(default=0.0, metadata=since(0.0))
    # cutmix: a box pasted from the pair (with mixup: each batch one or the other)
    cutmix_alpha: float = field(default=0.0, metadata=since(0.0))
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
    # streamed: crop and test resizes (checkpoints from before the key: bilinear)
    interpolation: Interpolation = field(
        default=Interpolation.bicubic, metadata=since("bilinear", acts=STREAMED)
    )


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.sgd  # set by the `optimizer` group
    lr: float = 0.1  # at batch 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW only


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.paper  # set by the `schedule` group
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # in milestone_unit
    milestone_unit: MilestoneUnit = MilestoneUnit.fraction
    gamma: float = 0.1  # lr factor at each milestone
    # Switch: auto warms up every CIFAR run, as the paper's appendix (train/optim.py)
    warmup: str = Switch.auto.value
    warmup_steps: int = 400
    warmup_factor: float = 0.1  # warm-up lr = factor * lr (0.01 for lr 0.1)
    min_lr: float = 0.0  # cosine floor


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, evaluated beside them (train/ema.py)."""

    decay: float | None = field(default=None, metadata=since(None))  # 0 or null: off
    # decay_t = min(decay, (1 + t) / (warmup_steps + t)) after t updates; 0: decay throughout
    warmup_steps: int = field(default=10, metadata=since(10))


@dataclass
class TrainerConfig:
    epochs: int = 164  # 164 x 390 steps ~ the paper's 64k iterations at batch 128
    max_steps: int | None = None  # overrides epochs
    # auto: bf16 autocast on GPUs (fp16 + grad scaler before bf16) and on CPUs with
    # native bf16 units (AMX, AVX512-BF16); fp32 on other CPUs
    precision: Precision = Precision.auto
    device: str = "auto"  # auto (a free GPU, else the CPU) | cpu | cuda | cuda:N
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    # Switch: replay the whole step as one CUDA graph (auto: on GPUs where it works)
    cuda_graphs: str = Switch.auto.value
    deterministic: bool = False
    sync_bn: bool = False  # data-parallel runs: batch norm statistics over all ranks (CUDA)
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    log_every: int = 50  # steps between train-loss points (TensorBoard, progress line)
    progress: bool = True  # a bar on a terminal, one line per log_every steps otherwise
    log_gradflow_every: int = 0  # steps between per-unit gradient norms in TensorBoard (0: off)
    # steps between measurements of the signal per unit on a fixed batch of
    # diagnose.batch_size images, to signal.jsonl and TensorBoard (0: off; train/signal.py)
    track_signal_every: int = 0
    # the training loss's (0: off; evaluation is plain cross-entropy)
    label_smoothing: float = field(default=0.0, metadata=since(0.0))
    ema: EmaConfig = field(default_factory=EmaConfig)
    # Stop cleanly (checkpoint, status interrupted, exit 75) before this much wall-clock
    # time since the command started: 90s, 25m, 2h or seconds; null: no limit (run/stop.py)
    time_limit: str | None = None
    # fp32 means fp32: TF32 tensor-core matmuls/convolutions on Ampere+ GPUs only when asked
    tf32: bool = False


@dataclass
class DiagnoseConfig:
    batch_size: int = 32  # images in the measured batch (its batch-norm statistics are used)


@dataclass
class EvalConfig:
    split: EvalSplit = EvalSplit.auto  # what mode=eval evaluates
    # recompute the BN running statistics over this many training batches first (0: off)
    recalibrate_bn: int = 0


class Head(str, Enum):
    keep = "keep"  # load the classifier too (the same classes)
    reset = "reset"  # a new classifier for this run's classes (fine-tuning)


@dataclass
class InitConfig:
    """``init_from=PATH``: a new run (step 0, new optimizer) starting from given weights."""

    path: str | None = None  # an export folder, a run folder (last.pt) or a .safetensors file
    head: Head = Head.keep
    strict: bool = True  # false: load what matches by name and shape, list the rest


@dataclass
class ScaleConfig:
    """How large the paper presets run (the `scale` group, used by configs/experiment/*).

    A preset names the paper's nets; the scale says which depth stands for each:
    the nets themselves at `full`, small stand-ins at `short`.
    """

    name: str = "full"  # full | short: set by the `scale` group
    resnet110: int = 110
    resnet164: int = 164
    resnet1001: int = 1001


@dataclass
class LoggerConfig:
    """Where a training run's curves and results go besides its folder's metrics.jsonl and
    summary.json (set by the `logger` group: `tensorboard`, or `mlflow` for both)."""

    tensorboard: bool = True  # event files in the run's folder (HPARAMS tab included)
    mlflow: bool = False  # an MLflow run (needs resnet-exp[mlflow]; see `mlflow` below)


@dataclass
class MlflowConfig:
    """Where ``logger=mlflow`` records runs (run/tracking.py). Nothing is sent anywhere but
    to this URI; a relative path in it is taken from the directory the command runs in."""

    # An SQLite file beside outputs/ (no server); or http(s)://HOST:PORT of an MLflow server
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "resnet-exp"  # the MLflow experiment's name (made when missing)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    depth: int = 110
    seed: int = 0
    # a last.pt, its run directory, or `auto` (this run directory's last.pt if any)
    resume: str | None = None
    # read a checkpoint of the older pickle format (it could run code: only a trusted one)
    trust_checkpoint: bool = False
    init_from: InitConfig = field(default_factory=InitConfig)  # start from given weights
    dry_run: bool = False  # build model and data, print what would run, exit
    mode: Mode = Mode.train  # train | diagnose | eval (see Mode)


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, key: str = "trainer.time_limit") -> float | None:
    """``90s``, ``25m``, ``2h``, ``1.5h`` or plain seconds, as seconds; None for no limit.
    Anything else, zero or negative is a one-line UserError naming ``key``."""
    from resnet_exp.errors import UserError

    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    text = str(value).strip().lower()
    unit = text[-1] if text[-1:] in _DURATION_UNITS else ""
    try:
        seconds = float(text[: len(text) - len(unit)]) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise UserError(
            f"{key}={value!r} is not a positive duration: pass seconds or a number "
            f"with s, m or h (90s, 25m, 2h), or null for no limit"
        )
    return seconds


def linear_lr(lr: float, batch: int, global_batch: int) -> float:
    """``${linear_lr:0.1,256,${data.batch_size}}``: a learning rate set for ``batch``,
    scaled linearly to the run's global batch."""
    return float(lr) * int(global_batch) / int(batch)


def register_configs() -> None:
    OmegaConf.register_new_resolver("linear_lr", linear_lr, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def config_tree(cfg: Config) -> dict[str, Any]:
    """The resolved config as nested plain dicts (enums as their names): what a
    checkpoint keeps."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return tree  # type: ignore[return-value]


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"model.block": "preact", ...}``: the resolved config as dotted keys."""
    return flatten(config_tree(cfg))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
