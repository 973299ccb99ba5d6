"""The networks: parameter counts, depth rules and the orderings' structure."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from resnet_exp import build_model
from resnet_exp.errors import UserError
from resnet_exp.models import resolve_unit
from resnet_exp.models.shortcuts import PadShortcut, Projection, float_under_autocast

from conftest import params_of

# PAPER.md: ResNet-20 0.27M, -56 0.85M, -110 1.7M, -1202 19.4M (original units,
# option A); ResNet-164 1.7M, -1001 10.2M (bottleneck, pre-act).
PAPER_PARAMS_M = {
    ("original", 20): "0.27",
    ("original", 56): "0.85",
    ("original", 110): "1.7",
    ("original", 1202): "19.4",
    ("preact", 164): "1.7",
    ("preact", 1001): "10.2",
}
# Exact counts of these architectures, for regressions.
EXACT = {
    ("original", 20): 269_722,
    ("original", 56): 853_018,
    ("original", 110): 1_727_962,
    ("original", 1202): 19_421_274,
    ("preact", 164): 1_703_258,
    ("preact", 1001): 10_327_706,
}


@pytest.mark.parametrize(("block", "depth"), list(PAPER_PARAMS_M))
def test_parameter_counts_match_paper(block: str, depth: int) -> None:
    n = params_of(block, depth)
    assert n == EXACT[block, depth]
    stated = PAPER_PARAMS_M[block, depth]
    paper = float(stated) * 1e6
    # The paper rounds (1.7M): allow 1% or half a unit of its last printed digit.
    # ResNet-1001 is the exception: the authors' reference architecture (built
    # here) has 10.33M parameters where the paper prints 10.2M (1.3% lower).
    half_unit = 0.5 * 10 ** -len(stated.split(".")[1]) * 1e6
    tol = 0.013 * paper if depth == 1001 else max(0.01 * paper, half_unit)
    assert abs(n - paper) <= tol, f"{n:,} vs paper {stated}M"


def test_param_count_same_for_every_ordering_at_basic_depths() -> None:
    counts = {
        b: params_of(b, 56)
        for b in ("original", "bn_after_add", "relu_before_add", "relu_only_preact", "preact")
    }
    # (b) moves a BN, (c) a ReLU: same count. (d) starts its units with a ReLU,
    # so its stem conv has no BN of its own (16 weights + 16 biases fewer).
    assert counts["relu_only_preact"] == counts["original"] - 32
    del counts["relu_only_preact"]
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize(
    ("depth", "unit", "n"),
    [
        (20, "basic", 3),
        (56, "basic", 9),
        (110, "basic", 18),
        (1202, "basic", 200),
        (164, "bottleneck", 18),
        (1001, "bottleneck", 111),
        (47, "bottleneck", 5),
    ],
)
def test_depth_picks_unit(depth: int, unit: str, n: int) -> None:
    assert resolve_unit(depth) == (unit, n)


def test_unit_override() -> None:
    assert resolve_unit(164, "basic") == ("basic", 27)
    assert resolve_unit(110, "single") == ("single", 36)  # the paper's 1-layer-skip ResNet-110


@pytest.mark.parametrize(
    ("depth", "unit", "names"),
    [
        (100, "auto", ["98", "104", "101"]),
        (0, "auto", ["8", "11"]),
        (-5, "auto", ["8", "11"]),
        (111, "bottleneck", ["110", "119"]),
        (21, "basic", ["20", "26"]),
    ],
)
def test_bad_depth_names_nearest_valid(depth: int, unit: str, names: list[str]) -> None:
    with pytest.raises(UserError) as err:
        resolve_unit(depth, unit)
    msg = str(err.value)
    assert f"depth={depth}" in msg and "\n" not in msg
    for name in names:
        assert name in msg


# --- structure of each ordering ------------------------------------------------

LETTER = {nn.Conv2d: "c", nn.BatchNorm2d: "b", nn.ReLU: "r"}

# The paper's Fig. 4, written as the sequence the unit must execute ("+" is the addition).
FIGURE_BASIC = {
    "original": "cbrcb+r",
    "bn_after_add": "cbrc+br",
    "relu_before_add": "cbrcbr+",
    "relu_only_preact": "rcbrcb+",
    "preact": "brcbrc+",
}
FIGURE_BOTTLENECK = {
    "original": "cbrcbrcb+r",
    "bn_after_add": "cbrcbrc+br",
    "relu_before_add": "cbrcbrcbr+",
    "relu_only_preact": "rcbrcbrcb+",
    "preact": "brcbrcbrc+",
}


def trace(unit: nn.Module) -> tuple[str, fx.Graph, fx.GraphModule]:
    """The unit's ops in execution order, skipping the shortcut path."""
    gm = fx.symbolic_trace(unit)
    seq = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and not node.target.startswith("shortcut"):
            mod = gm.get_submodule(node.target)
            seq.append(LETTER.get(type(mod), "?"))
        elif node.op == "call_function" and "add" in str(node.target):
            seq.append("+")
    return "".join(seq), gm.graph, gm


def identity_input(graph: fx.Graph) -> fx.Node:
    """What the addition's shortcut operand reads, through the shortcut module and the
    fp32 cast under autocast (a call in the graph: it runs only under autocast)."""
    add = next(n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target))
    shortcut = add.args[0]
    if shortcut.op == "call_function" and shortcut.target is float_under_autocast:
        shortcut = shortcut.args[0]
    return shortcut.args[0] if shortcut.op == "call_module" else shortcut


@pytest.mark.parametrize("block", list(FIGURE_BASIC))
@pytest.mark.parametrize(("depth", "figure"), [(20, FIGURE_BASIC), (164, FIGURE_BOTTLENECK)])
def test_unit_matches_figure(block: str, depth: int, figure: dict[str, str]) -> None:
    model = build_model(block, depth)
    middle = model.units[2]  # an ordinary unit: identity shortcut, no shape change
    seq, graph, _ = trace(middle)
    assert seq == figure[block]
    # The identity path carries the unit's input x itself, untouched.
    x = next(n for n in graph.nodes if n.op == "placeholder")
    assert identity_input(graph) is x


@pytest.mark.parametrize("block", ["original", "bn_after_add"])
def test_post_activation_output_is_non_negative(block: str) -> None:
    model = build_model(block, 20).eval()
    out = model.units[1](torch.randn(4, 16, 32, 32) * 3)  # (a), (b) end in ReLU
    assert out.min() >= 0


def test_preact_adds_branch_to_untouched_identity() -> None:
    unit = build_model("preact", 20).units[2].eval()
    x = torch.randn(2, 16, 32, 32)
    x_before = x.clone()
    out = unit(x)
    assert torch.equal(x, x_before)  # the pre-activation did not overwrite x in place
    torch.testing.assert_close(out - unit.branch(unit.pre(x)), x)


def test_relu_only_preact_keeps_negative_identity() -> None:
    unit = build_model("relu_only_preact", 20).units[2].eval()
    x = -torch.rand(2, 16, 32, 32)
    out = unit(x)
    torch.testing.assert_close(out - unit.branch(unit.pre(x)), x)  # ReLU(x) fed only the branch


def test_downsampling_shortcuts() -> None:
    a = build_model("original", 20)  # basic: option A (zero padding)
    assert isinstance(a.units[3].shortcut, PadShortcut)
    x = torch.randn(2, 16, 32, 32)
    y = a.units[3].shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()
    b = build_model("preact", 164)  # bottleneck: option B (projection)
    proj = b.units[18].shortcut
    assert isinstance(proj, Projection) and proj[0].stride == (2, 2)
    assert len(proj) == 1  # the pre-act branch ends in a conv, so no BN on the projection
    assert len(build_model("original", 164).units[18].shortcut) == 2  # conv + BN


def test_preact_projection_reads_shared_preactivation() -> None:
    unit = build_model("preact", 164).units[18].eval()  # stage 2's first unit: 64 -> 128, stride 2
    x = torch.randn(2, 64, 32, 32)
    pre = unit.pre(x)
    torch.testing.assert_close(unit(x), unit.shortcut(pre) + unit.branch(pre))


def test_preact_net_stem_and_final_activation() -> None:
    pre = build_model("preact", 20)
    assert len(pre.stem) == 1 and isinstance(pre.stem[0], nn.Conv2d)  # bare stem conv
    assert pre.units[0].share_preact  # first unit's BN-ReLU feeds both paths
    assert [type(m) for m in pre.head] == [nn.BatchNorm2d, nn.ReLU]  # BN-ReLU before pooling
    orig = build_model("original", 20)
    assert [type(m) for m in orig.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert isinstance(orig.head, nn.Identity)


@pytest.mark.parametrize(("stride_at", "strides"), [("first", [2, 1, 1]), ("conv3x3", [1, 2, 1])])
def test_bottleneck_stride_placement(stride_at: str, strides: list[int]) -> None:
    # first: resnet-pre-act.lua (and the authors' Caffe models); conv3x3: fb.resnet.torch
    unit = build_model("preact", 164, stride_at=stride_at).units[18]
    convs = [m for m in unit.branch if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [1, 3, 1]
    assert [c.stride[0] for c in convs] == strides
    assert params_of("preact", 164, stride_at=stride_at) == EXACT["preact", 164]


def test_he_initialisation() -> None:
    model = build_model("preact", 56)
    conv = model.units[5].branch[3]
    assert isinstance(conv, nn.Conv2d)
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.1 * (2 / fan_out) ** 0.5
    bn = model.units[5].pre[0]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


@pytest.mark.parametrize("block", list(FIGURE_BASIC))
def test_forward_backward_all_orderings(block: str) -> None:
    for depth in (20, 29):  # basic and bottleneck
        model = build_model(block, depth, num_classes=7)
        out = model(torch.randn(3, 3, 32, 32))
        assert out.shape == (3, 7)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_activation_checkpointing_same_gradients_and_bn_statistics() -> None:
    torch.manual_seed(0)
    plain = build_model("preact", 20)
    ckpt = build_model("preact", 20, checkpoint_segments=3)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # The recomputation in backward must not update the running statistics again.
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        if "running" in name:
            torch.testing.assert_close(a, b)


def test_unknown_block_is_user_error() -> None:
    with pytest.raises(UserError, match="block='nope'"):
        build_model("nope", 20)
