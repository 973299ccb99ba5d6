"""Batch norm over groups of a step's images ("ghost" batches), as on several GPUs.

The paper's batch of 128 ran on 2 GPUs, so each BN normalised 64 images (32
in the batch-64 ResNet-1001 run). ``GhostBatchNorm2d`` gives one device the
same statistics: the batch is cut into groups of ``group`` images and each
group is normalised by its own mean and variance. It is vectorised: the
groups are folded into the channel dimension, ``(G*n, C, H, W) -> (n, G*C,
H, W)``, and one ``F.batch_norm`` normalises G*C channels, which is G batch
norms of C channels; the weight and bias are shared by the groups (repeated,
so their gradients sum over groups, as DDP's all-reduce sums them over GPUs).

Running statistics (used at evaluation) follow ``stats``:

- ``first``: the first group's, as a data-parallel run keeps them: DDP with
  ``broadcast_buffers`` (this runner's data-parallel mode) copies rank 0's to
  every rank, and fb.resnet.torch checkpoints the first GPU's replica
  (checkpoints.lua:45-47), whose statistics saw only the first part of each batch;
- ``mean``: the mean of the groups' updates (lower variance, no GPU run keeps it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnet_exp.models.options import BnStats, choose


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are per group of ``group`` images.

    Evaluation, and a batch of at most ``group`` images, are plain batch norm.
    Same parameters and buffers as ``BatchNorm2d`` (checkpoints load either way).
    """

    def __init__(
        self, num_features: int, group: int, stats: BnStats | str = BnStats.first, **kw
    ) -> None:
        super().__init__(num_features, **kw)
        self.group, self.stats = group, choose(BnStats, stats, "model.bn_stats").value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ghost_batch_norm(self, x)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Training on more than ``group`` images: one batch norm per group."""
        n, c = x.shape[:2]
        if n % self.group:
            raise ValueError(f"a batch of {n} images does not split into groups of {self.group}")
        g = n // self.group
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)  # once per step, as one BN per GPU counts
            if momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        # (G*n, C, H, W) -> (n, G*C, H, W): channel j*C + k is channel k of group j.
        folded = x.unflatten(0, (g, self.group)).transpose(0, 1).flatten(1, 2)
        mean = var = None
        if self.track_running_stats:
            mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        w = None if self.weight is None else self.weight.repeat(g)
        b = None if self.bias is None else self.bias.repeat(g)
        y = F.batch_norm(folded, mean, var, w, b, True, momentum or 0.0, self.eps)
        if mean is not None and var is not None:
            with torch.no_grad():  # each group updated its own copy; keep one (see module doc)
                pick = (lambda t: t[0]) if self.stats == "first" else (lambda t: t.mean(0))
                self.running_mean.copy_(pick(mean.view(g, c)))
                self.running_var.copy_(pick(var.view(g, c)))
        # Back to (G*n, C, H, W) in the input's memory format (channels_last stays so).
        out = torch.empty_like(x, dtype=y.dtype)
        out.unflatten(0, (g, self.group)).copy_(y.unflatten(1, (g, c)).transpose(0, 1))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}, stats={self.stats}"


@torch.fx.wrap  # the batch's size picks the path: a call in a traced graph, decided per call
def ghost_batch_norm(bn: GhostBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    if not bn.training or x.shape[0] <= bn.group:
        return nn.BatchNorm2d.forward(bn, x)
    return bn.grouped(x)


def convert_ghost_bn(
    module: nn.Module, group: int, stats: BnStats | str = BnStats.first
) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a ``GhostBatchNorm2d`` with its state."""
    if type(module) is nn.BatchNorm2d:
        ghost = GhostBatchNorm2d(
            module.num_features,
            group,
            stats,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=module.running_mean.device if module.running_mean is not None else None,
        )
        ghost.load_state_dict(module.state_dict())
        ghost.train(module.training)
        return ghost
    for name, child in module.named_children():
        setattr(module, name, convert_ghost_bn(child, group, stats))
    return module
