"""The authors' recipe: each choice of docs/fidelity.md, and what breaks if it regresses."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from resnet_exp import build_model
from resnet_exp.config import Config, DataConfig, OptimizerConfig, ScheduleConfig
from resnet_exp.data import Normalize, TrainLoader
from resnet_exp.data.sources import Split
from resnet_exp.errors import UserError
from resnet_exp.models import NetSpec
from resnet_exp.models.ghost_bn import GhostBatchNorm2d, convert_ghost_bn
from resnet_exp.models.shortcuts import PadShortcut
from resnet_exp.models.units import ResidualUnit
from resnet_exp.models.variants import Gate
from resnet_exp.train.context import check
from resnet_exp.train.optim import build_optimizer, build_scheduler, milestone_steps, warmup_on

from conftest import REPO, compose_config


def net_of(cfg):
    """The net a run of ``cfg`` builds (CIFAR data)."""
    return NetSpec.from_config(cfg.model, cfg.depth, streamed=False)


def config(*overrides: str) -> Config:
    return compose_config(list(overrides))


def lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


# --- 1. warm-up -------------------------------------------------------------------


@pytest.mark.parametrize(
    "net", [("block=preact", "depth=20"), ("block=original", "depth=164", "dataset=cifar100")]
)
def test_auto_warmup_on_every_cifar_run(net: tuple[str, ...]) -> None:
    # The paper's appendix: all CIFAR runs, pre-act and shallow nets included
    # (the old rule left these two out).
    cfg = config(*net)
    assert warmup_on(cfg.schedule, cfg.data.name)
    assert not warmup_on(config(*net, "schedule.warmup=false").schedule, cfg.data.name)
    assert not warmup_on(ScheduleConfig(), "synthetic")


def test_warmup_is_lr_001_for_400_steps() -> None:
    opt = build_optimizer(nn.Linear(1, 1), config_free_sgd())
    sched = build_scheduler(opt, ScheduleConfig(), 64_000, warmup=True, steps_per_epoch=391)
    seen = lrs(sched, opt, 402)
    assert seen[0] == seen[399] == pytest.approx(0.01) and seen[400] == pytest.approx(0.1)


def config_free_sgd() -> OptimizerConfig:
    return OptimizerConfig()


# --- 2. stride placement --------------------------------------------------------


def test_default_stride_is_the_authors() -> None:
    convs = [m for m in build_model("preact", 29).units[3].branch if isinstance(m, nn.Conv2d)]
    assert convs[0].stride == (2, 2)  # resnet-pre-act.lua:70, on the 1x1


# --- 3. ghost batch norm ----------------------------------------------------------


def per_group_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: int):
    """Each group through its own copy of the plain net: one copy per 'GPU'."""
    copies = [copy.deepcopy(model) for _ in range(groups)]
    outs = []
    for net, xg, yg in zip(copies, x.chunk(groups), y.chunk(groups)):
        out = net(xg)
        # The global batch's mean loss: each GPU's sum over the whole batch size.
        F.cross_entropy(out.float(), yg, reduction="sum").div(len(x)).backward()
        outs.append(out)
    return torch.cat(outs), copies


@pytest.mark.parametrize("stats", ["first", "mean"])
@pytest.mark.parametrize(
    ("depth", "channels_last", "bf16"),
    [(8, False, False), (11, True, False), (8, True, True)],  # basic, bottleneck; autocast
)
def test_ghost_bn_step_equals_the_groups_run_apart(
    stats: str, depth: int, channels_last: bool, bf16: bool
) -> None:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain = build_model("preact", depth, width=4).to(memory_format=fmt)
    ghost = copy.deepcopy(plain)
    convert_ghost_bn(ghost, group=4, stats=stats)
    assert sum(isinstance(m, GhostBatchNorm2d) for m in ghost.modules()) > 5
    x = torch.randn(12, 3, 8, 8).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = ghost(x)
        F.cross_entropy(out.float(), y).backward()
        ref, copies = per_group_reference(plain, x, y, 3)
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(out, ref, **tol)
    for name, p in ghost.named_parameters():
        grad = sum(dict(c.named_parameters())[name].grad for c in copies)
        torch.testing.assert_close(p.grad, grad, **tol, msg=name)
    for name, buf in ghost.named_buffers():
        bufs = [dict(c.named_buffers())[name] for c in copies]
        if "num_batches_tracked" in name:
            assert buf.item() == 1
        elif "running" in name:
            want = bufs[0] if stats == "first" else torch.stack(bufs).mean(0)
            torch.testing.assert_close(buf, want, atol=1e-5, rtol=1e-4, msg=name)
    # Activations keep the memory format: the next conv needs no conversion.
    bn = next(m for m in ghost.modules() if isinstance(m, GhostBatchNorm2d))
    z = torch.randn(8, bn.num_features, 4, 4).contiguous(memory_format=fmt)
    assert bn(z).is_contiguous(memory_format=fmt)


def test_ghost_bn_groups_really_differ_from_the_whole_batch() -> None:
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, group=4)
    x = torch.randn(8, 3, 4, 4)
    x[4:] += 5  # the second group is shifted: whole-batch statistics would see it
    ghost = bn(x)
    torch.testing.assert_close(ghost[4:], F.batch_norm(x[4:], None, None, training=True))
    assert not torch.allclose(ghost, F.batch_norm(x, None, None, training=True))
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    bn.eval(), plain.eval()  # evaluation: running statistics, as plain batch norm
    torch.testing.assert_close(bn(x), plain(x))


def test_presets_set_the_papers_bn_batch() -> None:
    for exp in ("table1", "table2", "table3"):
        cfg = config(f"+experiment={exp}")
        assert cfg.model.bn_group == 64 and cfg.data.batch_size == 128  # 2 GPUs
    assert config().model.bn_group is None  # a plain run: the whole batch
    model = net_of(config("+experiment=table2", "depth=20")).build(10)
    assert {m.group for m in model.modules() if isinstance(m, GhostBatchNorm2d)} == {64}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.bn_group=48"], "model.bn_group=48 does not divide the per-process batch of 128"),
        (["model.bn_group=0"], "model.bn_group=0 must be at least 1"),
        (["model.bn_group=64", "trainer.sync_bn=true"], "trainer.sync_bn=true contradict"),
    ],
)
def test_bad_bn_group_is_a_user_error(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        check(config(*overrides))


# --- 4. numerics ----------------------------------------------------------------------


def gated_forward(
    cfg: Config, zero_weights: bool = False
) -> tuple[torch.Tensor, list[torch.dtype], torch.Tensor]:
    """One bf16-autocast forward (what `trainer.precision=auto` picks on a GPU): every
    gated unit's 1 - g as its merge computes it, and every unit's output dtype."""
    torch.manual_seed(0)
    model = net_of(cfg).build(10)
    inputs: dict[nn.Module, tuple] = {}
    dtypes: list[torch.dtype] = []
    for u in model.modules():
        if isinstance(u, ResidualUnit):
            assert isinstance(u.merge, Gate)
            if zero_weights:  # g = sigmoid(b_g) everywhere
                nn.init.zeros_(u.merge.gate.weight)
            u.merge.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args))
            u.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(8, 3, 32, 32))
        # (1 - g) * 1 + 0: the merge's own arithmetic returns 1 - g.
        keep = [m(torch.ones_like(s), torch.zeros_like(b), x) for m, (s, b, x) in inputs.items()]
    assert len(keep) == 9  # ResNet-20 at scale=short: 9 units
    return torch.cat([k.flatten() for k in keep]), dtypes, logits


def test_gate_and_identity_path_stay_fp32_under_the_presets_numerics() -> None:
    row = ["+experiment=table1", "scale=short", "model.shortcut.name=shortcut_gating"]
    cfg = config(*row, "model.shortcut.gate_bias=-7")
    assert cfg.model.fp32_identity and cfg.trainer.precision.value == "auto"
    keep, dtypes, logits = gated_forward(cfg, zero_weights=True)
    assert keep.dtype == torch.float32 and logits.dtype == torch.float32
    assert set(dtypes) == {torch.float32}  # every unit's sum, the identity path
    # In bf16, 1 - sigmoid(-7) is exactly 1.0; in fp32 it is 0.99909.
    torch.testing.assert_close(keep, torch.full_like(keep, 0.99909), atol=1e-5, rtol=0)
    keep, _, _ = gated_forward(cfg)  # at initialisation: hardly any gate is lost
    assert keep.eq(1.0).float().mean() < 0.05
    # What the switch guards against: the whole stream in bf16 erases most gates.
    keep, dtypes, _ = gated_forward(
        config(*row, "model.shortcut.gate_bias=-7", "model.fp32_identity=false")
    )
    assert set(dtypes) == {torch.bfloat16}
    assert keep.eq(1.0).float().mean() > 0.5


def test_fp32_identity_changes_nothing_outside_autocast() -> None:
    torch.manual_seed(0)
    a = build_model("original", 8, shortcut="exclusive_gating")
    b = build_model("original", 8, shortcut="exclusive_gating", fp32_identity=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(a(x), b(x))


# --- 5. the batch-64 ResNet-1001 run ------------------------------------------------


def test_batch64_preset_is_the_published_run() -> None:
    # The preset alone (a single run, no sweep): batch 64, batch norm over 32.
    cfg = config("+experiment=resnet1001_batch64")
    assert cfg.data.batch_size == 64
    assert (cfg.model.block.value, cfg.depth, cfg.model.unit.value) == (
        "preact",
        1001,
        "bottleneck",
    )
    assert cfg.model.bn_group == 32 and cfg.trainer.epochs == 200 and cfg.optimizer.nesterov
    assert cfg.optimizer.lr == 0.1 and cfg.model.stride_at.value == "first"
    assert not warmup_on(cfg.schedule, cfg.data.name)
    opt = build_optimizer(nn.Linear(1, 1), cfg.optimizer)
    assert opt.defaults["nesterov"] and opt.defaults["dampening"] == 0
    assert milestone_steps(cfg.schedule, 200 * 781, 781) == [80 * 781, 121 * 781]
    spe = 3  # a few steps an epoch, to step through the whole schedule
    sched = build_scheduler(opt, cfg.schedule, 200 * spe, False, steps_per_epoch=spe)
    seen = lrs(sched, opt, 121 * spe + 1)
    # fb.resnet.torch train.lua:180: 1-based epochs 81 and 122 start at the lower lr.
    assert seen[80 * spe - 1] == pytest.approx(0.1) and seen[80 * spe] == pytest.approx(0.01)
    assert seen[121 * spe - 1] == pytest.approx(0.01) and seen[121 * spe] == pytest.approx(0.001)


def test_epoch_milestones_need_positive_epochs() -> None:
    opt = build_optimizer(nn.Linear(1, 1), config_free_sgd())
    sch = ScheduleConfig(milestones=[0.0, 10.0])
    sch.milestone_unit = type(sch.milestone_unit)("epoch")
    with pytest.raises(UserError, match="positive epoch counts"):
        build_scheduler(opt, sch, 1000, False, steps_per_epoch=10)


# --- 6. crop padding --------------------------------------------------------------------


@pytest.mark.parametrize("pad_value", ["mean", "zero"])
def test_crop_padding_colour(pad_value: str) -> None:
    images = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    norm = Normalize(mean, std, torch.device("cpu"))
    split = Split(images, torch.zeros(64, dtype=torch.int64))
    loader = TrainLoader(split, 64, norm, torch.device("cpu"), 0, pad=2, pad_value=pad_value)
    x, _ = loader.next()
    inside = norm(images[:1])[0, :, 0, 0]
    border = (
        torch.zeros(3)
        if pad_value == "mean"
        else norm(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten()
    )
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3)
    is_border = (pixels == border).all(1)
    assert is_border.any() and ((pixels == inside).all(1) | is_border).all()
    # The other mode's border colour is nowhere: the two modes pad differently
    # (mean: normalise, then zero-pad, as fb.resnet.torch; zero: black, then normalise).
    other = norm(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten()
    if pad_value == "zero":
        other = torch.zeros(3)
    assert not torch.equal(border, other) and not (pixels == other).all(1).any()
    assert DataConfig().pad_value.value == "mean"  # the default


# --- 7. option-A shortcut in pre-activation nets -------------------------------------


def test_preact_zero_pad_shortcut_reads_the_shared_preactivation() -> None:
    """fb.resnet.torch preresnet.lua:65-67,119-120: the first unit of every stage is
    `both_preact`, its shortcut (zero padding on CIFAR) reads BN-ReLU(x)."""
    torch.manual_seed(0)
    model = build_model("preact", 20).eval()
    for i in (3, 6):
        unit = model.units[i]
        assert isinstance(unit.shortcut, PadShortcut)
        x = torch.randn(2, unit.pre[0].num_features, 8, 8)
        pre = unit.pre(x)
        expect = F.pad(pre[:, :, ::2, ::2], (0, 0, 0, 0, 0, unit.shortcut.extra))
        torch.testing.assert_close(unit(x), expect + unit.branch(pre))
    raw = build_model("preact", 20, preact_shortcut="raw").eval()
    raw.load_state_dict(model.state_dict())
    unit = raw.units[3]
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(unit(x), unit.shortcut(x) + unit.branch(unit.pre(x)))
    assert model.units[2].share_preact is False  # identity shortcuts carry x itself


# --- 6. the ImageNet rows of docs/fidelity.md ---------------------------------------

IMAGENET_ELEMENTS = {
    "stem",
    "first pre-act unit",
    "shortcut type",
    "stride placement (bottleneck)",
    "training crop",
    "resize interpolation",
    "horizontal flip",
    "colour jitter",
    "lighting",
    "normalisation",
    "optimizer",
    "lr at other batches",
    "schedule",
    "batch-norm batch",
    "test crop 224",
    "test crop 320",
    "numerics",
}


def imagenet_rows() -> dict[str, list[str]]:
    text = (REPO / "docs" / "fidelity.md").read_text()
    section = text.split("\n## ImageNet (Table 5)\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("element", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_fidelity_doc_lists_every_imagenet_element_against_the_code() -> None:
    rows = imagenet_rows()
    assert set(rows) == IMAGENET_ELEMENTS
    cfg = config("+experiment=table5", "depth=200", "block=preact")
    tree = OmegaConf.structured(cfg)
    for element, (paper, fb, default, switch) in rows.items():
        assert paper and default, element
        # fb.resnet.torch's code is cited by file:line (the 320 crop has no code there)
        assert re.search(r"\b[A-Za-z]+\.(lua|md):\d+", fb), (element, fb)
        for key in re.findall(r"`((?:data|model|optimizer|schedule|trainer)\.[a-z_]+)", switch):
            absent = object()
            assert OmegaConf.select(tree, key, default=absent) is not absent, (element, key)
    # The defaults the rows name are the presets' values.
    assert f"`{cfg.model.stride_at.value}`" in rows["stride placement (bottleneck)"][2]
    assert cfg.data.interpolation.value in rows["resize interpolation"][2]
    assert cfg.data.eval_crops == [224, 320] and "366" in rows["test crop 320"][2]
    assert round(320 / cfg.data.eval_crop_ratio) == 366
    assert cfg.optimizer.nesterov and "Nesterov" in rows["optimizer"][2]
    assert cfg.trainer.epochs == 90 and "90 epochs" in rows["schedule"][2]
