"""An exponential moving average of the weights, beyond the paper (``trainer.ema``).

Built on ``torch.optim.swa_utils.AveragedModel`` with an averaging function of its
own: torch's ``get_ema_multi_avg_fn`` has a fixed decay, and this one warms it up as
TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` does,
``decay_t = min(decay, (1 + t) / (warmup_steps + t))`` after ``t`` updates (the first
update copies the weights), so the early average is not dominated by the random
initial weights.

Batch-norm buffers are averaged too (``use_buffers=True``), as torchvision's
classification reference and timm's ``ModelEmaV2`` do: running statistics collected
under the live weights describe the live net's activations, and the averaged weights'
ones drift with them; the average of the statistics tracks the average of the
weights without the extra pass over the training images that recomputing them
(``swa_utils.update_bn``) would cost at every evaluation. The integer
``num_batches_tracked`` is copied, not averaged.

The update runs after every optimizer step, with device ops only: ``AveragedModel``
holds the average and its count, but its ``update_parameters`` reads the count on the
host twice a step (a GPU sync each, stalling the queue of asynchronous steps), so
after the first update (a copy) the average is taken here, by the same averaging
function, with the count kept on the host too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from resnet_exp.config import EmaConfig
from resnet_exp.errors import UserError

TensorList = list[torch.Tensor]


def check_ema(cfg: EmaConfig) -> None:
    decay = cfg.decay
    if decay is not None and not 0 <= decay < 1:
        raise UserError(f"trainer.ema.decay={decay} must be in [0, 1) (0 or null: off)")
    if cfg.warmup_steps < 0:
        raise UserError(f"trainer.ema.warmup_steps={cfg.warmup_steps} must be >= 0 (0: none)")


def ema_update(decay: float, warmup_steps: int):
    """``AveragedModel``'s ``multi_avg_fn``: ``avg <- d * avg + (1 - d) * current`` for the
    floating-point tensors, with ``d`` the warmed-up decay (a device tensor: no host sync
    of its own)."""

    full: dict[torch.device, torch.Tensor] = {}  # the decay on each device, made once

    @torch.no_grad()
    def update(averaged: TensorList, current: TensorList, n_averaged: torch.Tensor) -> None:
        if not torch.is_floating_point(averaged[0]):  # num_batches_tracked: a count
            for a, c in zip(averaged, current):
                a.copy_(c)
            return
        device = n_averaged.device
        if device not in full:
            full[device] = torch.tensor(decay, device=device)
        d = full[device]
        if warmup_steps:
            d = torch.minimum(d, (1.0 + n_averaged) / (warmup_steps + n_averaged))
        # avg + (1 - d) * (current - avg); the tensor-weight ops read d on the device
        # (_foreach_lerp_ would take it as a Scalar: a host sync).
        step = torch._foreach_sub(current, averaged)
        torch._foreach_mul_(step, (1 - d).to(averaged[0].dtype))
        torch._foreach_add_(averaged, step)

    return update


class WeightAverage:
    """The averaged copy of the net: updated after each step, evaluated beside the net,
    its state (the averaged weights and buffers and the update count) checkpointed."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int) -> None:
        device = next(model.parameters()).device
        self.averaged = AveragedModel(
            model,
            device=device,
            multi_avg_fn=ema_update(decay, warmup_steps),
            use_buffers=True,
        )
        self.averaged.requires_grad_(False)
        self.buffers = AveragedBuffers(self.averaged.module)
        self.average = ema_update(decay, warmup_steps)
        self.updates = 0  # = averaged.n_averaged, on the host

    @classmethod
    def of(cls, model: nn.Module, cfg: EmaConfig) -> WeightAverage | None:
        """None when ``trainer.ema.decay`` is 0 or null (the paper's recipe)."""
        check_ema(cfg)
        return cls(model, cfg.decay, cfg.warmup_steps) if cfg.decay else None

    @property
    def module(self) -> nn.Module:
        """The averaged net, to evaluate."""
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        if self.updates == 0:  # the first: AveragedModel copies the weights
            self.averaged.update_parameters(model)
        else:
            averaged = [*self.module.parameters(), *self.module.buffers()]
            current = [*model.parameters(), *model.buffers()]
            count = self.averaged.n_averaged
            for kind in (True, False):  # floating tensors, then the integer counts
                pairs = [
                    (a, c.detach())
                    for a, c in zip(averaged, current)
                    if a.is_floating_point() is kind
                ]
                if pairs:
                    self.average([a for a, _ in pairs], [c for _, c in pairs], count)
            count += 1  # on the device: no sync
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return dict(self.averaged.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
        self.updates = int(self.averaged.n_averaged)  # one sync, at the resume


class AveragedBuffers:
    """The averaged batch-norm buffers alone: a data-parallel rank's own. The ranks'
    weights are the same (DDP averages the gradients), but each rank's running
    statistics follow its own share of the batch, and so do their averages."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return {name: b.detach().clone() for name, b in self.module.named_buffers()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                b.copy_(state[name])
