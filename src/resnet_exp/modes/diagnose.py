"""``mode=diagnose``: gradient flow through a freshly initialised net, and sweep overlays.

One run builds the model as training would (same seed, same data), takes one
batch of the training set, runs one forward and backward pass with the batch
norms in training mode (batch statistics, as in every training step; at
initialisation the running statistics are not yet an estimate of anything)
and writes, in its run directory (the pass is ``models.gradflow.measure``, the
one ``trainer.track_signal_every`` repeats during training, train/signal.py):

- ``gradflow.csv``: one row per signal x_0 .. x_L (see ``gradflow.py``);
- ``gradflow.png``: std, gradient norm and identity coefficient against the index;
- TensorBoard: ``diagnose/*`` curves whose step is the signal index, and the figure;
- ``summary.json`` with ``grad_ratio_first_last`` and ``forward_growth_last_first``.

A sweep (``-m``) ends with an overlay (``resnet_exp.callbacks.SweepOverlay``,
registered in ``configs/config.yaml``) drawing every job's CSV into one figure
in the sweep directory.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_exp.config import Config, Mode
from resnet_exp.models import count_params
from resnet_exp.models.gradflow import GradFlow, measure
from resnet_exp.run.records import SUMMARY, RunRecords
from resnet_exp.run.result import RunResult, Status, SummaryKey
from resnet_exp.train.context import RunContext
from resnet_exp.train.setup import prepare
from resnet_exp.train.signal import probe_batch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("resnet_exp")

CSV_NAME = "gradflow.csv"
PNG_NAME = "gradflow.png"
OVERLAY_CSV = "gradflow_overlay.csv"
OVERLAY_PNG = "gradflow_overlay.png"
FIELDS = ["index", "signal", "stage", "std", "grad_norm", "identity_coef", "numel"]


def diagnose(cfg: Config, ctx: RunContext) -> RunResult:
    t_start = time.perf_counter()
    # The model and the first batch training would see (same seed, order, augmentation).
    data, model = prepare(cfg, ctx)
    batch = cfg.diagnose.batch_size
    net = ctx.net
    info: dict[str, Any] = {
        "mode": Mode.diagnose.value,
        "block": net.block.value,
        "depth": net.depth,
        "unit": net.unit.value,
        "params": count_params(model),
        "dataset": cfg.data.name,
        "data_source": data.source,
        "batch_size": batch,
        "device": str(ctx.device),
        "precision": ctx.precision.value,
        "seed": cfg.seed,
    }
    if cfg.dry_run:
        print(json.dumps(info, indent=2))
        return RunResult(Status.completed, info)

    run_dir, block = ctx.run_dir, net.block.value
    flow, loss = measure(model, *probe_batch(data, batch, cfg.seed, ctx.placement))

    result = RunResult(
        Status.completed,
        {
            **info,
            "loss": loss,
            **flow.summary(),
            SummaryKey.wall_time_s: round(time.perf_counter() - t_start, 2),
        },
    )
    write(run_dir, f"{block} ResNet-{net.depth}", flow, result.summary)
    log.info(summary_line(result.summary))
    return result


def write(run_dir: Path, label: str, flow: GradFlow, summary: dict[str, Any]) -> None:
    """gradflow.csv, gradflow.png, the TensorBoard curves and figure, summary.json."""
    write_csv(run_dir / CSV_NAME, flow)
    fig = plot([(label, flow)], title=_title(summary))
    fig.savefig(run_dir / PNG_NAME, dpi=120)
    with RunRecords(run_dir) as records:
        for i, row in enumerate(flow.rows()):
            records.scalars(
                i,
                {
                    "diagnose/std_vs_signal": row["std"],
                    "diagnose/grad_norm_vs_signal": row["grad_norm"],
                    "diagnose/identity_coef_vs_signal": row["identity_coef"],
                },
            )
        if records.writer is not None:
            records.writer.add_figure("diagnose/figure", fig, 0)  # closes the figure
        records.summary(summary)


def summary_line(s: dict[str, Any]) -> str:
    return (
        f"{s['block']} ResNet-{s['depth']}: gradient norm first/last unit "
        f"{s['grad_ratio_first_last']:.3g}, forward std growth last/first "
        f"{s['forward_growth_last_first']:.3g} (batch {s['batch_size']}, seed {s['seed']})"
    )


def _title(s: dict[str, Any]) -> str:
    return f"{s['dataset']}, batch {s['batch_size']}, seed {s['seed']}"


def write_csv(path: Path, flow: GradFlow) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(flow.rows())


def read_csv(path: Path) -> GradFlow:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return GradFlow(
        std=[float(r["std"]) for r in rows],
        grad_norm=[float(r["grad_norm"]) for r in rows],
        identity_coef=[float(r["identity_coef"]) for r in rows],
        stage=[int(r["stage"]) for r in rows],
        numel=[int(r["numel"]) for r in rows],
    )


def plot(series: list[tuple[str, GradFlow]], title: str = "") -> Figure:
    """Std, gradient norm (log scales) and identity coefficient against the signal index."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(8, 9), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for label, flow in series:
        idx = range(len(flow.std))
        axes[0].plot(idx, flow.std, label=label, lw=1.2)
        axes[1].plot(idx, flow.grad_norm, label=label, lw=1.2)
        axes[2].plot(idx, flow.identity_coef, label=label, lw=1.2)
    stages = series[0][1].stage
    if all(flow.stage == stages for _, flow in series):  # one depth: mark where stages change
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                for ax in axes:
                    ax.axvline(i - 0.5, color="0.7", lw=0.8, ls=":")
    axes[0].set(yscale="log", ylabel="std of $x_l$ (forward)")
    axes[1].set(yscale="log", ylabel=r"$\|\partial E/\partial x_l\|$ (backward)")
    axes[2].set(
        ylabel="identity coefficient\n"
        r"$\langle g_l, g_e\rangle / \|g_e\|^2$, $e$: end of stage",
        xlabel="$l$: input of unit $l$ ($l = L$: output of the last unit)",
    )
    axes[2].axhline(1.0, color="0.5", lw=0.8)
    # Where no identity path is left (BN after the addition) the coefficient swings by
    # hundreds; the range that tells orderings apart is around [0, 1].
    coefs = [c for _, flow in series for c in flow.identity_coef if math.isfinite(c)]
    if coefs and (min(coefs) < -1 or max(coefs) > 2):
        axes[2].set_ylim(max(min(coefs), -1) - 0.05, min(max(coefs), 2) + 0.05)
        axes[2].set_title("(clipped to [-1, 2])", fontsize="small", loc="right")
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle("gradient flow at initialisation" + (f"\n{title}" if title else ""))
    return fig


def overlay(sweep_dir: Path) -> Path | None:
    """Every job's gradflow.csv in ``sweep_dir`` drawn into one figure (and one CSV)."""
    jobs = []
    for path in sorted(sweep_dir.glob(f"*/{CSV_NAME}"), key=_job_order):
        summary_path = path.parent / SUMMARY
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if Status.of(summary) is Status.completed:
            jobs.append((path.parent.name, summary, read_csv(path)))
    if not jobs:
        return None
    # Label each job by what varies across the sweep (the ordering, unless only depth varies).
    keys = ["block", "depth", "dataset", "batch_size", "seed"]
    varying = [k for k in keys if len({str(s.get(k)) for _, s, _ in jobs}) > 1] or ["block"]
    label = {
        name: " ".join(f"{s[k]}" if k == "block" else f"{k}={s[k]}" for k in varying)
        for name, s, _ in jobs
    }
    fixed = {k: jobs[0][1].get(k) for k in keys if k not in varying}
    title = ", ".join(f"{k}={v}" for k, v in fixed.items())
    fig = plot([(label[name], flow) for name, _, flow in jobs], title=title)
    out = sweep_dir / OVERLAY_PNG
    fig.savefig(out, dpi=120)
    with open(sweep_dir / OVERLAY_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "block", "depth", *FIELDS])
        writer.writeheader()
        for name, s, flow in jobs:
            for row in flow.rows():
                writer.writerow({"job": name, "block": s["block"], "depth": s["depth"], **row})
    for _, s, _ in jobs:
        log.info(summary_line(s))
    log.info("gradient-flow overlay of %d runs: %s", len(jobs), out)
    return out


def _job_order(path: Path) -> tuple[int, str]:
    num = path.parent.name.split("_", 1)[0]
    return (int(num) if num.isdigit() else 1 << 30, path.parent.name)
