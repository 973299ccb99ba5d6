"""Every job of every CIFAR preset, at the paper's size, built by the trainer's own
builder (``build_setup``): the nets, their batch-norm groups, strides and shortcut
variants, and the recipe, as the preset says. (Table 5's ImageNet jobs:
``test_imagenet.py::test_table5_preset_dry_run``.)

The presets' CIFAR-10/100 are stood in for by tiny image folders with the same
classes: ``build_setup`` loads them through the same code path as the real copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from resnet_exp.data.batch_aug import BatchAugment
from resnet_exp.models.ghost_bn import GhostBatchNorm2d
from resnet_exp.models.shortcuts import Projection
from resnet_exp.models.units import ResidualUnit
from resnet_exp.models.variants import DropShortcut, Gate, Scale
from resnet_exp.train.context import resolve
from resnet_exp.train.setup import build_setup

from conftest import preset_config, preset_jobs

# The paper's parameter counts (PAPER.md), in millions, for 10 classes.
PAPER_PARAMS = {110: 1.7, 164: 1.7, 1001: 10.2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CIFAR-10 and CIFAR-100 stand-ins as train/ + test/ class folders: enough training
    images for one batch of 128, one test image a class."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    out = {}
    for name, classes, per_class in (("cifar10", 10, 13), ("cifar100", 100, 2)):
        for split, n in (("train", per_class), ("test", 1)):
            for c in range(classes):
                d = root / name / split / f"c{c:03d}"
                d.mkdir(parents=True)
                for i in range(n):
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(d / f"{i}.png")
        out[name] = root / name
    return out


def build_jobs(experiment: str, folders: dict[str, Path], cache_dir: Path):
    """Each job of the preset's first seed at scale=full, built on the CPU from the
    stand-in folders (decoded once, into the session's cache)."""
    for job in preset_jobs(experiment, "full"):
        if "seed=1" not in job:
            continue
        cfg = preset_config(job)
        cfg.data.root = str(folders[cfg.data.name])
        cfg.data.cache_dir = str(cache_dir)
        cfg.trainer.device = "cpu"
        cfg.trainer.channels_last = False  # the memory format needs no look at the layers
        yield cfg, build_setup(cfg, resolve(cfg, Path("unused")))  # writes nothing


def check_net(setup, bn_group: int) -> None:
    """The built net is the paper's at its full depth, with the preset's BN groups and
    the unit's stride where the config puts it."""
    cfg, model, info = setup.cfg, setup.model, setup.info
    assert info["depth"] == cfg.depth and cfg.depth in (110, 164, 1001)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, GhostBatchNorm2d) and m.group == bn_group for m in bns)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    units = [m for m in model.modules() if isinstance(m, ResidualUnit)]
    per_unit = {"basic": 2, "single": 1, "bottleneck": 3}[info["unit"]]
    assert len(units) * per_unit + 2 == cfg.depth  # a stem conv and the classifier
    branch_strided = [m for m in strided if not _in_shortcut(model, m)]
    assert len(branch_strided) == 2  # the first unit of stages 2 and 3
    if info["unit"] == "bottleneck":  # stride_at=first: on the 1x1 that opens the unit
        assert cfg.model.stride_at.value == "first"
        assert all(m.kernel_size == (1, 1) for m in branch_strided)


def _in_shortcut(model: nn.Module, conv: nn.Module) -> bool:
    return any(
        conv is m for p in model.modules() if isinstance(p, (Projection, Gate)) for m in p.modules()
    )


def check_params(setup) -> None:
    params = setup.info["params"] / 1e6
    classes = setup.data.num_classes
    # the classifier's weights beyond 10 classes (64 or 256 features a class, and a bias)
    features = setup.model.fc.in_features if hasattr(setup.model, "fc") else None
    extra = 0 if features is None else (classes - 10) * (features + 1) / 1e6
    # the paper rounds; original units carry a few more BNs than pre-act ones
    assert params - extra == pytest.approx(PAPER_PARAMS[setup.cfg.depth], rel=0.02), params


def test_table1_every_case_builds_at_full_size(folders: dict[str, Path], cache_dir: Path) -> None:
    seen = []
    for cfg, s in build_jobs("table1", folders, cache_dir):
        check_net(s, bn_group=64)
        spec = cfg.model.shortcut
        merges = [m for m in s.model.modules() if isinstance(m, (Scale, Gate, DropShortcut))]
        projections = [m for m in s.model.modules() if isinstance(m, Projection)]
        units = [m for m in s.model.modules() if isinstance(m, ResidualUnit)]
        name = spec.name.value
        if name == "scaling":
            assert len(merges) == len(units)
            assert {(m.shortcut_scale, m.branch_scale) for m in merges} == {
                (spec.shortcut_scale, spec.branch_scale)
            }
        elif name.endswith("gating"):
            assert len(merges) == len(units)
            assert {m.exclusive for m in merges} == {name == "exclusive_gating"}
            assert all(bool((m.gate.bias == spec.gate_bias).all()) for m in merges)
        elif name == "dropout":
            assert len(merges) == len(units) and {m.drop.p for m in merges} == {spec.dropout}
        elif name == "conv1x1":
            assert not merges and len(projections) == len(units)
        else:
            assert name == "identity" and not merges and not projections  # option A
            check_params(s)
        assert (s.cfg.optimizer.lr, s.cfg.optimizer.momentum) == (0.1, 0.9)
        assert s.warmup and s.info["dataset"] == "cifar10"
        seen.append(spec.describe())
    assert len(seen) == 11 and len(set(seen)) == 11


def test_table2_and_table3_every_net_builds_at_full_size(
    folders: dict[str, Path], cache_dir: Path
) -> None:
    built = set()
    for experiment in ("table2", "table3"):
        for cfg, s in build_jobs(experiment, folders, cache_dir):
            check_net(s, bn_group=64)
            check_params(s)
            assert s.warmup and s.cfg.trainer.epochs == 164 and s.cfg.trainer.max_steps is None
            assert s.data.num_classes == {"cifar10": 10, "cifar100": 100}[cfg.data.name]
            built.add((experiment, cfg.data.name, cfg.model.block.value, cfg.depth, s.info["unit"]))
    assert len(built) == 10 + 16
    assert ("table3", "cifar100", "preact", 1001, "bottleneck") in built
    assert ("table3", "cifar10", "original", 110, "single") in built


def test_resnet1001_batch64_builds_as_the_published_run(
    folders: dict[str, Path], cache_dir: Path
) -> None:
    ((cfg, s),) = build_jobs("resnet1001_batch64", folders, cache_dir)
    check_net(s, bn_group=32)
    check_params(s)
    assert (cfg.model.block.value, cfg.depth, s.info["batch_size"]) == ("preact", 1001, 64)
    group = s.optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    assert not s.warmup and s.total_steps == 200 * s.loader.steps_per_epoch


def test_modern_every_job_builds_at_full_size_with_its_recipe(
    folders: dict[str, Path], cache_dir: Path
) -> None:
    built = set()
    for cfg, s in build_jobs("modern", folders, cache_dir):
        check_net(s, bn_group=64)
        check_params(s)
        assert s.warmup and s.cfg.trainer.epochs == 164 and s.cfg.trainer.max_steps is None
        assert s.train_step.label_smoothing == 0.1
        assert isinstance(s.loader, BatchAugment) and s.loader.size == 16
        assert not (s.loader.mixup_alpha or s.loader.cutmix_alpha)
        assert s.ema is not None and s.ema.module is not s.model
        lrs = type(s.scheduler).__name__, [type(x).__name__ for x in s.scheduler._schedulers]
        assert lrs == ("SequentialLR", ["ConstantLR", "CosineAnnealingLR"])
        built.add((cfg.model.block.value, cfg.depth, s.info["unit"]))
    assert built == {
        (b, d, u) for b in ("original", "preact") for d, u in ((110, "basic"), (164, "bottleneck"))
    }
