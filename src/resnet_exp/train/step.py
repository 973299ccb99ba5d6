"""One training step (forward, loss, backward, update), eager or replayed from a CUDA graph."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from resnet_exp.config import Precision, Switch
from resnet_exp.errors import UserError
from resnet_exp.run.runtime import autocast
from resnet_exp.train.context import RunContext

Batch = tuple[torch.Tensor, torch.Tensor]
# torch.compile modes that replay CUDA graphs of their own
OWN_GRAPHS = ("reduce-overhead", "max-autotune")

log = logging.getLogger("resnet_exp")


def train_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The training loss: cross-entropy against labels, or against soft targets (rows of
    class probabilities, from mixup/cutmix), with ``label_smoothing`` mixing in the
    uniform distribution (torch's: ``(1 - eps) * target + eps / classes``). Evaluation
    is plain cross-entropy (train/evaluation.py)."""
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


class EagerStep:
    """Forward under autocast, backward through the grad scaler, optimizer step.

    ``plain=True`` runs the model itself rather than its compiled form, for a
    step whose activations are hooked (gradient-flow logging).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        device: torch.device,
        precision: Precision,
        label_smoothing: float = 0.0,
    ) -> None:
        self.forward, self.model, self.optimizer, self.scaler = forward, model, optimizer, scaler
        self.device, self.precision = device, precision
        self.label_smoothing = label_smoothing

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plain: bool = False) -> Batch:
        with autocast(self.device, self.precision):
            logits = (self.model if plain else self.forward)(x)
            loss = train_loss(logits, y, self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()


class CudaGraphStep:
    """The whole step captured once as a CUDA graph, then replayed.

    Hand-written because the deep CIFAR nets are launch-bound on a GPU: a
    ResNet-1001 step is ~10k small kernels whose launch cost exceeds their
    run time, and a replay is one launch. Needs static shapes (the loader
    drops the last partial batch), no host syncs inside the step (so not fp16
    with its grad scaler), and fused SGD, which reads the learning rate from a
    device tensor that is refilled from the scheduler's value before each replay.
    """

    WARMUP = 3  # eager steps before capture: cudnn autotuning, allocator, optimizer state

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        label_smoothing: float = 0.0,
    ) -> None:
        self.forward, self.model, self.optimizer, self.precision = (
            forward,
            model,
            optimizer,
            precision,
        )
        self.label_smoothing = label_smoothing
        self.graph: torch.cuda.CUDAGraph | None = None

    def _compute(self) -> Batch:
        with torch.autocast(
            "cuda",
            dtype=torch.bfloat16,
            enabled=self.precision is Precision.bf16,
            cache_enabled=False,
        ):
            logits = self.forward(self.static_x)
            loss = train_loss(logits, self.static_y, self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def _state(self) -> list[torch.Tensor]:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        return tensors

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        had_state = bool(self.optimizer.state)
        saved = [t.detach().clone() for t in self._state()]
        groups = self.optimizer.param_groups
        self.lrs = [torch.tensor(float(g["lr"]), device=x.device) for g in groups]
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lrs):
            g["lr"] = lr  # the captured update reads the lr from this tensor
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.optimizer.zero_grad(set_to_none=True)
                self._compute()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may run their own steps meanwhile (packed runs)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_loss, self.static_logits = self._compute()
        # Undo the warm-up steps: back to the state before them, in place (the
        # graph holds these addresses). Momentum buffers the warm-up created
        # start at zero, which makes the first replayed update equal to SGD's
        # first step (buffer = gradient).
        with torch.no_grad():
            # (`saved` may be shorter: it lacks optimizer state the warm-up created.)
            for t, s in zip(self._state(), saved):
                t.copy_(s)
            if not had_state:
                for state in self.optimizer.state.values():
                    for t in state.values():
                        if isinstance(t, torch.Tensor) and t.is_floating_point():
                            t.zero_()
        for g, lr in zip(groups, floats):
            g["lr"] = lr  # the scheduler keeps working on plain floats

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plain: bool = False) -> Batch:
        if self.graph is None:
            self._capture(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        for lr, g in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(g["lr"])
        self.graph.replay()
        return self.static_loss, self.static_logits


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ctx: RunContext,
    compile_model: bool = False,
    compile_mode: str = "default",
    cuda_graphs: str = "auto",
    hooks: bool = False,
    label_smoothing: float = 0.0,
) -> EagerStep | CudaGraphStep:
    """The step the trainer runs: compiled or not, eager or replayed from a CUDA graph.

    ``cuda_graphs=auto`` uses a graph wherever one works: on a GPU, with bf16
    or fp32, plain fused SGD and no activation checkpointing.
    """
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if compile_model:
        forward = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    device, precision = ctx.device, ctx.precision
    blockers = graph_blockers(model, optimizer, device, precision, ctx.world.enabled)
    if hooks:
        blockers.append("trainer.log_gradflow_every=0 (hooked steps run eagerly)")
    own = compile_model and compile_mode in OWN_GRAPHS
    if own:  # torch.compile's own CUDA graphs cannot be captured inside this step's
        blockers.append(
            f"trainer.compile_mode other than {compile_mode} (it captures CUDA graphs of its "
            f"own; max-autotune-no-cudagraphs does not)"
        )
    choice = Switch.of(cuda_graphs, "trainer.cuda_graphs")
    if choice == Switch.true and blockers:
        raise UserError(f"trainer.cuda_graphs=true needs {'; '.join(blockers)}")
    if own and choice == Switch.auto and device.type == "cuda":
        log.info(
            "trainer.cuda_graphs=auto: off, trainer.compile_mode=%s captures its own", compile_mode
        )
    if choice == Switch.false or blockers:
        return EagerStep(forward, model, optimizer, scaler, device, precision, label_smoothing)
    return CudaGraphStep(forward, model, optimizer, precision, label_smoothing)


def graph_blockers(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision,
    data_parallel: bool = False,
) -> list[str]:
    """What rules out a CUDA-graph step, as 'needs ...' phrases (empty: nothing)."""
    blockers = []
    if device.type != "cuda":
        blockers.append(f"a CUDA device (running on {device})")
    if precision is Precision.fp16:
        blockers.append("bf16 or fp32 (fp16's grad scaler syncs with the host every step)")
    if not (isinstance(optimizer, torch.optim.SGD) and optimizer.defaults.get("fused")):
        blockers.append("optimizer=sgd (fused)")
    if getattr(model, "checkpoint_segments", 0):
        blockers.append("model.checkpointing=0 (recomputation saves RNG state on the host)")
    if data_parallel:
        blockers.append("a single process (DDP's gradient all-reduce is not captured)")
    return blockers
