"""Per-unit forward scale and backward gradient norm, read with hooks on the residual units.

The paper's argument is about the signals ``x_l`` between units: with identity
mappings ``x_L = x_l + sum F``, so ``dE/dx_l = dE/dx_L (1 + d/dx_l sum F)``
and the gradient reaching any unit carries an unmodified copy of the deepest
one. For one forward/backward pass the probe records ``x_0 .. x_L`` (the
input of every unit and the output of the last one) and, for each,
``std(x_l)``, ``||x_l||``, ``||dE/dx_l||`` (L2 norms over the whole batch) and
the *identity coefficient* ``<dE/dx_l, dE/dx_e> / ||dE/dx_e||^2``, where ``x_e``
is the last signal of the same shape (the end of ``x_l``'s stage): 1 when
``dE/dx_l`` holds ``dE/dx_e`` unchanged plus parts orthogonal to it; and for
each unit ``||F(x_l)||``, the norm of its residual branch's output.

``measure`` is the one pass both ``mode=diagnose`` and the tracking during
training (``trainer.track_signal_every``, train/signal.py) run.

A forward pre-hook on each unit sees its input, a forward hook on its branch
the branch's output, and a tensor hook on the input sees its gradient. The
module hooks exist only while ``capture()`` is open, so an unmeasured step
runs untouched. No unit overwrites its input in place (the
identity shortcut still reads it), so the tensor hooked is the one the next
unit used, even with in-place ReLUs elsewhere; the pre-act first unit's shared
BN-ReLU is inside that unit, so ``x_0`` is the stem output it reads.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnet_exp.errors import UserError


def residual_units(model: nn.Module) -> list[nn.Module]:
    """The residual units in order (``model.units``; DDP and compiled wrappers unwrapped)."""
    while not hasattr(model, "units"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    units = getattr(model, "units", None)
    if not isinstance(units, nn.Sequential) or len(units) == 0:
        raise TypeError(f"{type(model).__name__} has no residual units (.units) to probe")
    return list(units)


@dataclass
class GradFlow:
    """Signals ``x_0 .. x_L``: index ``l < L`` is unit ``l``'s input, ``L`` the last unit's output."""

    std: list[float]  # std of x_l over the batch
    grad_norm: list[float]  # ||dE/dx_l||, the L2 norm over the batch
    identity_coef: list[float]  # <dE/dx_l, dE/dx_e> / ||dE/dx_e||^2, x_e the end of x_l's stage
    stage: list[int]  # 0, 1, 2, ...: which map size x_l has
    numel: list[int]  # elements of x_l (batch x channels x height x width)
    norm: list[float] = field(default_factory=list)  # ||x_l||, the L2 norm over the batch
    branch_norm: list[float] = field(default_factory=list)  # per unit l < L: ||F(x_l)||

    @property
    def units(self) -> int:
        return len(self.std) - 1

    @property
    def grad_ratio(self) -> float:
        """||dE/dx_0|| / ||dE/dx_L||: below 1 the gradient shrinks on its way to the first unit."""
        return _ratio(self.grad_norm[0], self.grad_norm[-1])

    @property
    def forward_growth(self) -> float:
        """std(x_L) / std(x_0): how much the signal grows through the units."""
        return _ratio(self.std[-1], self.std[0])

    def summary(self) -> dict[str, float]:
        return {
            "grad_ratio_first_last": self.grad_ratio,
            "forward_growth_last_first": self.forward_growth,
        }

    def unit_rows(self) -> list[dict[str, Any]]:
        """Per residual unit ``l``: its stage (the map size of its output), ``||x_l||``,
        ``||F(x_l)||``, ``||dE/dx_l||`` and ``||dE/dx_l|| / ||dE/dx_L||`` (the paper's Eq. 5)."""
        last = self.grad_norm[-1]
        return [
            {
                "unit": i,
                "stage": self.stage[i + 1],
                "identity_norm": self.norm[i],
                "branch_norm": self.branch_norm[i],
                "grad_norm": self.grad_norm[i],
                "grad_ratio": _ratio(self.grad_norm[i], last),
            }
            for i in range(self.units)
        ]

    def stage_summary(self, prefix: str = "") -> dict[str, float]:
        """Per stage ``k``: ``stage{k}/grad_ratio_first`` (the gradient ratio at the stage's first
        unit) and ``stage{k}/branch_identity_ratio`` (the median over its units of
        ``||F(x_l)|| / ||x_l||``, which the one unit that changes the shape barely moves)."""
        rows = self.unit_rows()
        out: dict[str, float] = {}
        for k in sorted({r["stage"] for r in rows}):
            units = [r for r in rows if r["stage"] == k]
            ratios = [_ratio(r["branch_norm"], r["identity_norm"]) for r in units]
            ratios = [r for r in ratios if not math.isnan(r)]  # a diverged net's
            out[f"{prefix}stage{k}/grad_ratio_first"] = units[0]["grad_ratio"]
            out[f"{prefix}stage{k}/branch_identity_ratio"] = (
                statistics.median(ratios) if ratios else math.nan
            )
        return out

    def rows(self) -> list[dict[str, Any]]:
        n = self.units
        return [
            {
                "index": i,
                "signal": f"unit {i} input" if i < n else f"unit {n - 1} output",
                "stage": self.stage[i],
                "std": self.std[i],
                "grad_norm": self.grad_norm[i],
                "identity_coef": self.identity_coef[i],
                "numel": self.numel[i],
            }
            for i in range(n + 1)
        ]


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


class GradFlowProbe:
    """Measures x_0 .. x_L of ``model``'s residual units during one captured pass.

    Run the forward pass inside ``with probe.capture():``, then ``backward()``
    the loss and read ``probe.result()``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.units = residual_units(model)
        self._reset()

    def _reset(self) -> None:
        n = len(self.units) + 1
        # Statistics stay tensors on the device until result(): one host sync per pass.
        self._std: list[torch.Tensor | None] = [None] * n
        self._norm: list[torch.Tensor | None] = [None] * n
        self._branch: list[torch.Tensor | None] = [None] * (n - 1)
        self._grad: list[torch.Tensor | None] = [None] * n
        self._coef: list[torch.Tensor | None] = [None] * n
        self._shape: list[tuple[int, ...]] = [()] * n
        self._ends: list[int] | None = None
        self._ref: torch.Tensor | None = None  # dE/dx_e of the stage backward is in
        self.first: torch.Tensor | None = None  # x_0 as the first unit read it

    @property
    def captured(self) -> bool:
        return self._std[0] is not None

    def _record(self, i: int, x: Any) -> None:
        # First call only: checkpointed segments run their units again during backward.
        if self._std[i] is not None or not isinstance(x, torch.Tensor):
            return
        with torch.no_grad():
            xf = x.detach().float()
            self._std[i], self._norm[i] = xf.std(), xf.norm()
        self._shape[i] = tuple(x.shape)
        if i == 0:
            self.first = x
        if x.requires_grad:
            x.register_hook(lambda g: self._on_grad(i, g))

    def _stage_ends(self) -> list[int]:
        """For each signal, the last index of its run of equal shapes."""
        ends, end = [0] * len(self._shape), len(self._shape) - 1
        for i in range(len(self._shape) - 1, -1, -1):
            if i < len(self._shape) - 1 and self._shape[i] != self._shape[i + 1]:
                end = i
            ends[i] = end
        return ends

    @torch.no_grad()
    def _record_branch(self, i: int, out: Any) -> None:
        if self._branch[i] is None and isinstance(out, torch.Tensor):
            self._branch[i] = out.detach().float().norm()

    @torch.no_grad()
    def _on_grad(self, i: int, g: torch.Tensor) -> None:
        if self._grad[i] is not None:
            return
        if self._ends is None:  # the forward pass is complete once gradients flow
            self._ends = self._stage_ends()
        g = g.detach().float()
        self._grad[i] = g.norm()
        # Backward reaches a stage's end before any signal inside it.
        if self._ends[i] == i:
            self._ref = g.clone()  # autograd owns g and may reuse its memory
            self._coef[i] = g.new_ones(())
        elif self._ref is not None and self._ref.shape == g.shape:
            self._coef[i] = (g * self._ref).sum() / self._ref.square().sum()

    @contextmanager
    def capture(self) -> Iterator[GradFlowProbe]:
        """Record the next forward pass; the gradients arrive with its backward pass."""
        self._reset()
        last = len(self.units)
        handles = [
            unit.register_forward_pre_hook(lambda _m, args, i=i: self._record(i, args[0]))
            for i, unit in enumerate(self.units)
        ]
        handles.append(
            self.units[-1].register_forward_hook(lambda _m, _a, out: self._record(last, out))
        )
        handles += [
            unit.branch.register_forward_hook(lambda _m, _a, out, i=i: self._record_branch(i, out))
            for i, unit in enumerate(self.units)
            if isinstance(getattr(unit, "branch", None), nn.Module)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def result(self, loss_scale: float = 1.0) -> GradFlow:
        """The captured pass's numbers (NaN where no gradient came); ``loss_scale``
        undoes a gradient scaler's factor."""
        if not self.captured:
            raise RuntimeError("no forward pass was captured")
        nan = self._std[0].new_full((), math.nan)  # type: ignore[union-attr]
        n = len(self._std)
        captured = (*self._std, *self._grad, *self._coef, *self._norm, *self._branch)
        values = torch.stack([v if v is not None else nan for v in captured]).tolist()
        sizes = [s[-1] for s in self._shape]
        stage_of = {size: k for k, size in enumerate(sorted(set(sizes), reverse=True))}
        flow = GradFlow(
            std=values[:n],
            grad_norm=[v / loss_scale for v in values[n : 2 * n]],
            identity_coef=values[2 * n : 3 * n],
            stage=[stage_of[s] for s in sizes],
            numel=[math.prod(s) for s in self._shape],
            norm=values[3 * n : 4 * n],
            branch_norm=values[4 * n :],
        )
        self._ref, self.first = None, None
        return flow


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA device whose random stream ``torch.random.fork_rng`` keeps (none elsewhere)."""
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


def measure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, probe: GradFlowProbe | None = None
) -> tuple[GradFlow, float]:
    """One forward and backward pass of ``(x, y)`` through ``model`` as it is (in training
    mode: the batch's statistics), read by ``probe``; the pass's numbers and its
    cross-entropy loss. Runs in the precision of the caller's context: fp32 outside autocast.

    The model is left as it was found, so a run that measures between its steps trains
    exactly as one that does not: gradients are asked of ``x_0`` only (no parameter's
    ``.grad`` is written, and the weights' gradients are not computed), the buffers
    (batch-norm running statistics, their batch counters) are saved and written back, and
    the random streams a unit may draw from (dropout shortcuts) are forked.
    """
    probe = probe if probe is not None else GradFlowProbe(model)
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=rng_devices(x.device)):
            with probe.capture():
                loss = F.cross_entropy(model(x), y)
            if probe.first is None or not probe.first.requires_grad:
                raise RuntimeError("the first unit's input does not require a gradient")
            torch.autograd.grad(loss, probe.first)  # the hooks read dE/dx_l on the way
    finally:
        with torch.no_grad():  # in place: a captured CUDA graph holds these tensors
            for b, value in zip(model.buffers(), saved):
                b.copy_(value)
    return probe.result(), loss.item()


class GradFlowMonitor:
    """Per-unit gradient norms in TensorBoard every ``every`` training steps (0: off).

    A measured step runs the model eagerly (a compiled graph would trace the
    hooks); other steps pay one boolean test.
    """

    def __init__(self, model: nn.Module, every: int) -> None:
        if every < 0:
            raise UserError(
                f"trainer.log_gradflow_every={every} must be 0 (off) or a positive step count"
            )
        self.every = every
        self.probe = GradFlowProbe(model) if every else None
        self._due, self._scale = False, 1.0

    @contextmanager
    def watch(self, step: int, scaler: torch.amp.GradScaler | None = None) -> Iterator[bool]:
        """Around the training step ``step`` (1-based); yields whether it is measured.

        The grad scaler's scale is read before the step updates it: the gradients
        the hooks see are scaled by it.
        """
        self._due = self.probe is not None and step % self.every == 0
        if not self._due:
            yield False
            return
        self._scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        with self.probe.capture():  # type: ignore[union-attr]
            yield True

    def log(self, records: Any, step: int) -> None:
        """After the step: write the measured step's numbers to TensorBoard."""
        if not self._due:
            return
        self._due = False
        flow = self.probe.result(loss_scale=self._scale)  # type: ignore[union-attr]
        width = len(str(flow.units))
        values = {f"gradflow/grad_norm/x_{i:0{width}d}": g for i, g in enumerate(flow.grad_norm)}
        values.update({f"gradflow/{k}": v for k, v in flow.summary().items()})
        records.scalars(step, values)
