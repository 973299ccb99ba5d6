"""The signal through the identity path during training (``trainer.track_signal_every``).

Every ``N`` steps, and once before the first step, the trainer measures its net on one
fixed batch with the probe ``mode=diagnose`` uses (``models.gradflow.measure``): per
residual unit ``||x_l||``, ``||F(x_l)||`` and ``||dE/dx_l|| / ||dE/dx_L||`` (the paper's
Eq. 5). The per-unit table goes to ``signal.jsonl`` in the run's folder, one row per
measured step; per-stage summaries go to TensorBoard (``signal/stage{k}/...``).

The fixed batch is the one ``mode=diagnose`` measures: the first ``diagnose.batch_size``
images a training loader seeded with the run's seed serves (this rank's share), from a
loader of its own, so the training loader's generators and position are untouched and
the step-0 row is ``mode=diagnose``'s figure. The measurement runs between steps, in
fp32, on the net itself (never inside a compiled or CUDA-graph step), and leaves the
weights' gradients, the batch-norm running statistics (saved and written back) and the
random streams (forked) as it found them; its time is kept out of the throughput.
"""

from __future__ import annotations

import time

import torch

from resnet_exp.data import DataSource, Placement
from resnet_exp.errors import UserError
from resnet_exp.models.gradflow import GradFlowProbe, measure, rng_devices
from resnet_exp.run.records import RunRecords, truncate_rows
from resnet_exp.train.setup import Setup

SIGNAL = "signal.jsonl"

Batch = tuple[torch.Tensor, torch.Tensor]


def probe_batch(data: DataSource, batch: int, seed: int, at: Placement) -> Batch:
    """The first batch of ``batch`` images (this rank's share) that a training loader
    seeded with ``seed`` serves, drawn from a loader of its own (no global RNG drawn)."""
    with torch.random.fork_rng(devices=rng_devices(at.device)):
        return data.train_loader(batch // at.world, seed, at).next()


class SignalTracker:
    """Measures the run's net on its fixed batch every ``every`` steps (0: off)."""

    def __init__(self, s: Setup, every: int) -> None:
        self.every = every
        self.model, self.device = s.model, s.device
        self.probe = GradFlowProbe(s.model) if every else None
        self.batch: Batch | None = None
        if every:
            batch = s.cfg.diagnose.batch_size
            if batch > len(s.data.train):
                raise UserError(
                    f"diagnose.batch_size={batch} (the batch trainer.track_signal_every "
                    f"measures) is larger than the {len(s.data.train)} training images"
                )
            self.batch = probe_batch(s.data, batch, s.cfg.seed, s.ctx.placement)

    def start(self, step: int, records: RunRecords) -> None:
        """Before this process's first step: a resumed run drops the rows after its
        checkpoint's ``step`` (it writes them again), a new run all rows, then measures
        its initial net (step 0)."""
        if not self.every:
            return
        if records.enabled:
            truncate_rows(records.run_dir / SIGNAL, step if step else -1)
        if step == 0:
            self.record(0, records)

    def after_step(self, step: int, records: RunRecords) -> float:
        """After training step ``step``: measure if it is due. The seconds it took (the
        trainer keeps them out of its throughput)."""
        if not self.every or step % self.every:
            return 0.0
        return self.record(step, records)

    def record(self, step: int, records: RunRecords) -> float:
        """Measure now; one row in signal.jsonl, the stage summaries in TensorBoard."""
        assert self.batch is not None and self.probe is not None
        if self.device.type == "cuda":  # the step's queued work is training time, not ours
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        flow, loss = measure(self.model, *self.batch, self.probe)
        units = flow.unit_rows()
        records.scalars(
            step,
            {
                "signal/loss": loss,
                "signal/grad_ratio_first": units[0]["grad_ratio"],
                **flow.stage_summary("signal/"),
            },
        )
        records.append(SIGNAL, {"step": step, "loss": loss, "units": units})
        return time.perf_counter() - t0
