"""The gradient-flow probe: its numbers, the paper's identity term, and the training hook."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resnet_exp import build_model
from resnet_exp.errors import UserError
from resnet_exp.models.gradflow import GradFlow, GradFlowMonitor, GradFlowProbe

from conftest import BLOCKS, compose_config, tb_scalars


@functools.cache  # the depth-1001 tests measure pre-act, seed 0, twice
def measure(block: str, depth: int, batch: int, seed: int = 0, **kw) -> GradFlow:
    """One forward/backward pass of a fresh net in training mode, as mode=diagnose runs it."""
    torch.manual_seed(seed)
    model = build_model(block, depth, **kw).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    probe = GradFlowProbe(model)
    with probe.capture():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return probe.result()


def signals(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and x_0 .. x_L, collected without the probe and without in-place ReLUs.

    The reference: an in-place ReLU after the last unit (the ReLU-only pre-act
    net's head) would otherwise turn the collected x_L into its ReLU.
    """
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU) and m.inplace]
    for m in relus:
        m.inplace = False
    xs: list[torch.Tensor] = []
    hooks = [u.register_forward_pre_hook(lambda _m, a: xs.append(a[0])) for u in model.units]
    hooks.append(model.units[-1].register_forward_hook(lambda _m, _a, out: xs.append(out)))
    out = model(x)
    for h in hooks:
        h.remove()
    for m in relus:
        m.inplace = True
    return out, xs


@pytest.mark.parametrize(
    ("block", "checkpointing"), [*((b, 0) for b in BLOCKS), ("preact", 2), ("original", 3)]
)
def test_probe_matches_autograd(block: str, checkpointing: int) -> None:
    """std, ||dE/dx_l|| and the identity coefficient equal what autograd gives directly.

    Channels-last tensors, in-place ReLUs and checkpointed segments (which run
    the units twice) must not change what is read.
    """
    torch.manual_seed(0)
    model = build_model(block, 20, checkpoint_segments=checkpointing).train()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))

    out, xs = signals(model, x)
    grads = torch.autograd.grad(F.cross_entropy(out, y), xs)
    probe = GradFlowProbe(model)
    with probe.capture():
        loss = F.cross_entropy(model(x), y)
    assert all(not u._forward_pre_hooks for u in model.units)  # removed when capture ends
    loss.backward()
    flow = probe.result()

    assert len(flow.std) == len(model.units) + 1 == 10
    torch.testing.assert_close(flow.std, [t.std().item() for t in xs], rtol=1e-5, atol=0)
    torch.testing.assert_close(flow.grad_norm, [g.norm().item() for g in grads], rtol=1e-4, atol=0)
    ends = {0: 3, 1: 6, 2: 9}  # ResNet-20: x_0..x_3 at 32 px, x_4..x_6 at 16 px, x_7..x_9 at 8 px
    assert flow.stage == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, g in enumerate(grads):
        e = grads[ends[flow.stage[i]]]
        coef = ((g * e).sum() / (e * e).sum()).item()
        assert flow.identity_coef[i] == pytest.approx(coef, rel=1e-4, abs=1e-6)
    assert flow.grad_ratio == pytest.approx(flow.grad_norm[0] / flow.grad_norm[-1])
    assert flow.forward_growth == pytest.approx(flow.std[-1] / flow.std[0])


def identity_path_checks(flow: GradFlow) -> None:
    """What an intact identity path gives, as measured for preact at depth 1001, batch 4.

    With nothing after the addition, dE/dx_l = dE/dx_e + (terms through the
    branches) for every x_l of a stage ending at x_e, so the gradient reaching
    an early unit cannot vanish relative to a late one. Measured (seeds 0-2):
    no ||dE/dx_l|| is below ||dE/dx_L|| (the smallest is at x_L itself), and in
    the second half of every stage the component of dE/dx_l along dE/dx_e is
    0.98-1.01 of it. Nearer a stage's start the branch terms outweigh the
    identity term about a hundredfold and their chance overlap with it makes
    the coefficient noisy at batch 4 (0.18-2.24 measured), so it is not checked there.
    """
    g_last = flow.grad_norm[-1]
    assert all(math.isfinite(g) and g >= 0.9 * g_last for g in flow.grad_norm)
    assert flow.grad_ratio > 1.0
    for k in sorted(set(flow.stage)):
        stage = [i for i, s in enumerate(flow.stage) if s == k]
        late = stage[len(stage) // 2 :]
        assert all(0.9 <= flow.identity_coef[i] <= 1.1 for i in late), (k, late)
    # Each unit adds its branch to the untouched identity: the signal grows.
    assert flow.forward_growth > 1.0


@pytest.mark.slow
def test_identity_term_keeps_preact_gradient_from_vanishing_at_depth_1001() -> None:
    """Pre-activation ResNet-1001 (333 bottleneck units), batch 4, at initialisation."""
    flow = measure("preact", 1001, batch=4, seed=0)
    assert flow.units == 333 and flow.stage.count(2) == 111
    identity_path_checks(flow)


class FakeRecords:
    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.logged[step] = values


class FakeScaler:
    """A gradient scaler's interface, with the factor the loss was multiplied by."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self.scale


def test_monitor_logs_every_n_steps_and_undoes_loss_scaling() -> None:
    torch.manual_seed(0)
    model = build_model("original", 20).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    reference = GradFlowProbe(model)
    with reference.capture():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    expected = reference.result()

    monitor, records = GradFlowMonitor(model, every=2), FakeRecords()
    for step in (1, 2, 3):
        with monitor.watch(step, FakeScaler(1024.0)) as measured:
            assert measured == (step == 2)
            assert bool(model.units[0]._forward_pre_hooks) == measured
            loss = F.cross_entropy(model(x), y) * 1024.0  # what a grad scaler does
            loss.backward()
        monitor.log(records, step)
    assert list(records.logged) == [2]
    logged = records.logged[2]
    norms = [logged[f"gradflow/grad_norm/x_{i}"] for i in range(10)]  # x_0 .. x_9
    torch.testing.assert_close(norms, expected.grad_norm, rtol=1e-4, atol=0)
    assert logged["gradflow/grad_ratio_first_last"] == pytest.approx(expected.grad_ratio, rel=1e-4)


def test_monitor_off_adds_no_hooks_and_rejects_negative() -> None:
    model = build_model("preact", 20)
    monitor = GradFlowMonitor(model, every=0)
    assert monitor.probe is None
    with monitor.watch(1) as measured:
        assert not measured and not model.units[0]._forward_pre_hooks
    with pytest.raises(UserError, match=r"trainer.log_gradflow_every=-1 must be 0 \(off\)"):
        GradFlowMonitor(model, every=-1)


def test_training_logs_gradflow_to_tensorboard(tmp_path: Path, data_args: list[str]) -> None:
    """trainer.log_gradflow_every=3 in a real (in-process) run: per-unit norms at steps 3 and 6."""
    from resnet_exp.train.loop import train

    overrides = [
        *data_args,
        "depth=20",
        "data.batch_size=32",
        "trainer.max_steps=6",
        "trainer.log_every=3",
        "trainer.log_gradflow_every=3",
        "trainer.progress=false",
    ]
    train(compose_config(overrides), tmp_path)

    tags = tb_scalars(tmp_path)
    per_unit = sorted(t for t in tags if t.startswith("gradflow/grad_norm/"))
    assert per_unit == [f"gradflow/grad_norm/x_{i}" for i in range(10)]
    for tag in per_unit:
        assert list(tags[tag]) == [3, 6]
        assert all(math.isfinite(v) and v > 0 for v in tags[tag].values())
    first, last = tags["gradflow/grad_norm/x_0"], tags["gradflow/grad_norm/x_9"]
    for step, ratio in tags["gradflow/grad_ratio_first_last"].items():
        assert ratio == pytest.approx(first[step] / last[step], rel=1e-5)


def late_coefs(flow: GradFlow) -> list[float]:
    """Identity coefficients of the second half of every stage (ends excluded: 1 by definition)."""
    out = []
    for k in sorted(set(flow.stage)):
        stage = [i for i, s in enumerate(flow.stage) if s == k]
        out += [flow.identity_coef[i] for i in stage[len(stage) // 2 : -1]]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_ordering_at_depth_1001(seed: int) -> None:
    """The five orderings of ResNet-1001, batch 4, seeds 0-2 (minutes per seed on 2 busy cores).

    Nothing after the addition (relu_before_add, relu_only_preact, preact):
    the identity term is intact, and measured as for preact. After the
    addition a ReLU (original) zeroes part of the gradient before it reaches
    the shortcut, and a BN (bn_after_add) rescales and recentres it: measured,
    the component along dE/dx_e falls to 0.49-0.54 (original) and to -0.48
    ... -0.05 (bn_after_add) within the second half of a stage, and with BN
    after the addition some ||dE/dx_l|| drop to 0.30 of ||dE/dx_L||.
    """
    flows = {block: measure(block, 1001, batch=4, seed=seed) for block in BLOCKS}
    for block in ("relu_before_add", "relu_only_preact", "preact"):
        identity_path_checks(flows[block])
    assert min(late_coefs(flows["original"])) < 0.7
    assert min(late_coefs(flows["bn_after_add"])) < 0.7
    bn_after = flows["bn_after_add"]
    assert min(bn_after.grad_norm) < 0.5 * bn_after.grad_norm[-1]
