"""The shortcut variants of Fig. 2: each has the structure and arithmetic its name promises."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_exp import ShortcutSpec, build_model, count_params
from resnet_exp.errors import UserError
from resnet_exp.models import BLOCKS, ResidualUnit
from resnet_exp.models.shortcuts import Add, PadShortcut, Projection
from resnet_exp.models.variants import DropShortcut, Gate, Scale

VARIANTS = ["identity", "scaling", "exclusive_gating", "shortcut_gating", "conv1x1", "dropout"]


def units(model: nn.Module) -> list[ResidualUnit]:
    return [m for m in model.modules() if isinstance(m, ResidualUnit)]


def unit_io(unit: ResidualUnit) -> tuple[int, int, int]:
    convs = [m for m in unit.branch if isinstance(m, nn.Conv2d)]
    return convs[0].in_channels, convs[-1].out_channels, max(c.stride[0] for c in convs)


def test_identity_is_the_default_network() -> None:
    torch.manual_seed(0)
    default = build_model("original", 20)
    torch.manual_seed(0)
    identity = build_model("original", 20, shortcut="identity")
    assert count_params(identity) == 269_722  # the paper's ResNet-20 (option A)
    for u in units(identity):
        assert isinstance(u.merge, Add)
        cin, cout, stride = unit_io(u)
        expect = nn.Identity if (cin, stride) == (cout, 1) else PadShortcut
        assert isinstance(u.shortcut, expect)
    x = torch.randn(2, 3, 32, 32)
    default.eval(), identity.eval()
    torch.testing.assert_close(default(x), identity(x), rtol=0, atol=0)


def test_scaling_applies_both_factors_in_every_unit() -> None:
    model = build_model("original", 8, shortcut=ShortcutSpec("scaling", 0.5, 0.25)).eval()
    for u in units(model):
        assert isinstance(u.merge, Scale)
        x = torch.randn(2, unit_io(u)[0], 16, 16)
        # The original unit: ReLU(0.5 * shortcut(x) + 0.25 * F(x)).
        expect = F.relu(0.5 * u.shortcut(x) + 0.25 * u.branch(x))
        torch.testing.assert_close(u(x), expect)


@pytest.mark.parametrize(
    ("name", "exclusive"), [("exclusive_gating", True), ("shortcut_gating", False)]
)
def test_gates_are_sigmoids_of_a_1x1_conv_of_the_unit_input(name: str, exclusive: bool) -> None:
    model = build_model("original", 20, shortcut=ShortcutSpec(name, gate_bias=-7.0)).eval()
    strides = []
    for u in units(model):
        cin, cout, stride = unit_io(u)
        gate = u.merge
        assert isinstance(gate, Gate) and isinstance(gate.gate, nn.Conv2d)
        conv = gate.gate
        # One gate per output element: a (strided) 1x1 conv from the input's width to the output's.
        assert conv.kernel_size == (1, 1) and conv.stride == (stride, stride)
        assert (conv.in_channels, conv.out_channels) == (cin, cout)
        assert torch.all(conv.bias == -7.0)  # b_g initial value
        assert conv.weight.std() > 0  # the gate's weights are initialised, not zero
        strides.append(stride)
        x = torch.randn(2, cin, 16, 16)
        g = torch.sigmoid(F.conv2d(x, conv.weight, conv.bias, stride))
        s, b = u.shortcut(x), u.branch(x)
        expect = F.relu((1 - g) * s + (g * b if exclusive else b))
        torch.testing.assert_close(u(x), expect)
    assert strides.count(2) == 2  # the downsampling units' gates are strided too

    # With zero weights the gate is sigmoid(b_g) everywhere.
    merge = units(model)[0].merge
    nn.init.zeros_(merge.gate.weight)
    s, b, x = torch.ones(1, 16, 4, 4), torch.full((1, 16, 4, 4), 3.0), torch.randn(1, 16, 4, 4)
    g = torch.sigmoid(torch.tensor(-7.0))
    expect = (1 - g) * s + (g * b if exclusive else b)
    torch.testing.assert_close(merge(s, b, x), expect.expand_as(s))


def test_gate_bias_from_config_default_and_override() -> None:
    model = build_model("original", 8, shortcut="exclusive_gating")
    assert all(torch.all(u.merge.gate.bias == -6.0) for u in units(model))
    model = build_model("original", 8, shortcut=ShortcutSpec("exclusive_gating", gate_bias=0.0))
    assert all(torch.all(u.merge.gate.bias == 0.0) for u in units(model))


@pytest.mark.parametrize(("block", "bn"), [("original", True), ("preact", False)])
def test_conv1x1_shortcut_on_every_unit(block: str, bn: bool) -> None:
    model = build_model(block, 20, shortcut="conv1x1")
    for u in units(model):
        cin, cout, stride = unit_io(u)
        assert isinstance(u.shortcut, Projection) and isinstance(u.merge, Add)
        conv = u.shortcut[0]
        assert conv.kernel_size == (1, 1) and conv.stride == (stride, stride)
        assert (conv.in_channels, conv.out_channels) == (cin, cout)
        assert isinstance(u.shortcut[-1], nn.BatchNorm2d) == bn  # BN where the branch ends in BN
    # ResNet-20 (269,722) plus a 1x1 conv on each of its 9 units' shortcuts:
    # 3 x 16x16, 16x32 + 2 x 32x32, 32x64 + 2 x 64x64 weights; BN adds 2 per output channel.
    convs = 3 * 16 * 16 + 16 * 32 + 2 * 32 * 32 + 32 * 64 + 2 * 64 * 64
    bns = 2 * 3 * (16 + 32 + 64) if bn else 0
    assert count_params(model) == 269_722 + convs + bns


def test_dropout_only_on_the_shortcut_and_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model("original", 8, shortcut=ShortcutSpec("dropout", dropout=0.5))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == len(units(model))  # one per unit, nowhere in a branch
    assert all(isinstance(u.merge, DropShortcut) for u in units(model))
    merge = units(model)[0].merge
    s, b, x = torch.full((4, 16, 8, 8), 2.0), torch.zeros(4, 16, 8, 8), torch.zeros(4, 16, 8, 8)

    merge.train()
    out = merge(s, b, x)
    assert set(out.unique().tolist()) == {0.0, 4.0}  # dropped, or kept and scaled by 1/(1-p)
    assert 0.4 < (out == 0).float().mean() < 0.6
    branch = torch.randn(4, 16, 8, 8)
    torch.testing.assert_close(merge(torch.zeros_like(s), branch, x), branch, rtol=0, atol=0)

    merge.eval()
    torch.testing.assert_close(merge(s, branch, x), s + branch, rtol=0, atol=0)


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("shortcut", VARIANTS)
def test_every_variant_with_every_ordering_trains(block: str, shortcut: str) -> None:
    """Ten SGD steps on one batch: gradients reach every parameter and the loss on
    that batch falls (the same dropout masks before and after)."""
    torch.manual_seed(0)
    model = build_model(block, 8, shortcut=shortcut)
    x, y = (
        torch.randn(8, 3, 16, 16),
        torch.arange(8) % 10,
    )  # 16 px: the same layers, a quarter of the work
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_now() -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    before = loss_now()
    for i in range(10):
        out = model(x)
        assert out.shape == (8, 10) and torch.isfinite(out).all()
        opt.zero_grad()
        F.cross_entropy(out, y).backward()
        if i == 0:
            grads = [p.grad for p in model.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()
    assert loss_now() < before - 0.05  # (slowest: exclusive gating, whose gates start near 0)


@pytest.mark.parametrize(("depth", "unit"), [(11, "bottleneck"), (11, "single")])
def test_gating_on_bottleneck_and_single_units(depth: int, unit: str) -> None:
    model = build_model("preact", depth, unit=unit, shortcut="exclusive_gating")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            lambda: ShortcutSpec("nope"),
            "model.shortcut.name='nope' is not one of identity, scaling",
        ),
        (
            lambda: build_model("original", 8, shortcut=ShortcutSpec("dropout", dropout=1.0)),
            "model.shortcut.dropout=1.0 must be in [0, 1)",
        ),
    ],
)
def test_bad_shortcut_values_are_user_errors(spec, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        spec()
