"""The nets as graphs: torch.fx tracing (and torchvision's feature extraction on it),
torch.export, and the state_dict keys that existing checkpoints hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from resnet_exp import build_model

from conftest import BLOCKS

KEYS = Path(__file__).parent / "data" / "state_dict_keys.json"


def stage_ends(net: nn.Module) -> list[str]:
    """``units.K`` for the last unit of every stage (the next one halves the map)."""

    def halves(unit: nn.Module) -> bool:
        return any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in unit.branch)

    starts = [i for i, u in enumerate(net.units) if i and halves(u)]
    assert starts, "every net has more than one stage"
    return [f"units.{i - 1}" for i in starts] + [f"units.{len(net.units) - 1}"]


def check_features(net: nn.Module, x: torch.Tensor) -> None:
    """The extractor's stage outputs and logits are the eager net's (forward hooks)."""
    net.eval()
    names = stage_ends(net)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        net.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, o.detach())
        )
        for n in names
    ]
    with torch.no_grad():
        logits = net(x)
    for h in hooks:
        h.remove()
    extractor = create_feature_extractor(net, {**{n: n for n in names}, "flatten": "pooled"})
    with torch.no_grad():
        out = extractor(x)
    for n in names:
        torch.testing.assert_close(out[n], seen[n], rtol=0, atol=0)
    torch.testing.assert_close(net.fc(out["pooled"]), logits)


# Basic units (ResNet-20) and bottleneck units (ResNet-29: 3 a stage, as ResNet-164's 18)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("depth", [20, 29])
def test_feature_extractor_on_every_ordering(block: str, depth: int) -> None:
    torch.manual_seed(0)
    check_features(build_model(block, depth), torch.randn(2, 3, 32, 32))


def test_feature_extractor_on_imagenet_resnet18() -> None:
    torch.manual_seed(0)
    net = build_model("preact", 18, 10, width=8, family="imagenet")
    check_features(net, torch.randn(2, 3, 64, 64))


NETS = {
    "preact-20": dict(block="preact", depth=20),
    "original-11-bottleneck": dict(block="original", depth=11, unit="bottleneck"),
    "gating": dict(block="preact", depth=8, shortcut="exclusive_gating"),
    "ghost-bn-checkpointed": dict(block="preact", depth=8, bn_group=2, checkpoint_segments=2),
    "imagenet-18": dict(block="original", depth=18, num_classes=10, width=8, family="imagenet"),
}


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_traced_net_equals_eager(name: str, bf16: bool, train: bool) -> None:
    """Same outputs, bit for bit, from the traced graph and the eager net, in fp32 and
    under bf16 autocast, where the identity path, the gates and the classifier stay fp32
    (the traced graph decides that per call, as the eager net does)."""
    torch.manual_seed(0)
    eager = build_model(**NETS[name]).train(train)
    traced = fx.symbolic_trace(eager)
    twin = build_model(**NETS[name]).train(train)  # separate BN buffers for a training step
    twin.load_state_dict(eager.state_dict())
    size = 64 if "imagenet" in name else 32
    x = torch.randn(4, 3, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        want, got = twin(x), traced(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if train:  # the training-mode BN (ghost or plain) updated the same statistics
        for (k, a), b in zip(twin.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_traced_gate_runs_in_fp32_under_autocast() -> None:
    """A traced gated net keeps its gate in fp32 under autocast: closing the gate to -7
    gives the fp32 value of ``1 - sigmoid(-7)``, which bf16 would round to 1."""
    net = build_model("preact", 8, shortcut="exclusive_gating").eval()
    traced = fx.symbolic_trace(net)
    gates = [m for m in traced.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert gates
    seen: list[torch.dtype] = []
    for g in gates:
        g.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traced(torch.randn(2, 3, 32, 32))
    assert seen and set(seen) == {torch.float32}


def test_export_keeps_working() -> None:
    net = build_model("preact", 8).eval()  # one unit a stage: the graph of a deeper net, shorter
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(net, (x,))
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(y), net(y))


# --- state_dict keys: what existing checkpoints hold ----------------------------------

# The nets whose keys and shapes tests/data/state_dict_keys.json holds, as the nets
# were built before the family classes became one class.
KEY_CASES = [
    *[(b, 20, {}) for b in BLOCKS],
    ("preact", 8, {"preact_shortcut": "raw", "downsample": "B"}),
    ("preact", 29, {"unit": "bottleneck"}),
    ("original", 29, {"unit": "bottleneck", "stride_at": "conv3x3"}),
    ("preact", 11, {"unit": "single"}),
    ("preact", 20, {"downsample": "B", "shortcut": "exclusive_gating"}),
    ("original", 20, {"shortcut": "conv1x1"}),
    ("preact", 20, {"shortcut": "scaling"}),
    ("preact", 20, {"shortcut": "dropout", "bn_group": 4}),
    ("preact", 18, {"family": "imagenet"}),
    ("original", 18, {"family": "imagenet"}),
    ("preact", 50, {"family": "imagenet"}),
]


def test_state_dict_keys_and_shapes_are_unchanged() -> None:
    saved = json.loads(KEYS.read_text())
    assert len(saved) == len(KEY_CASES)
    for block, depth, kw in KEY_CASES:
        name = f"{block}-{depth}-" + ",".join(f"{k}={v}" for k, v in kw.items())
        with torch.device("meta"):
            net = build_model(block, depth, 10, width=4 if "family" in kw else None, **kw)
        keys = [f"{k} {tuple(v.shape)}" for k, v in net.state_dict().items()]
        assert keys == saved[name], name
