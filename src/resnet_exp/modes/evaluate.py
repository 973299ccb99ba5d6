"""A trained run, used again: ``mode=eval`` evaluates its checkpoint, ``load_run`` loads it.

``resnet-exp mode=eval resume=RUN_DIR`` composes the run's own config (the
overrides its checkpoint keeps, as a resume does), evaluates the checkpoint's
weights, prints loss, top-1 error and per-class error, and writes them to
``eval.json`` in the run directory. It changes none of the run's other files:
configs/config.yaml gives this mode no ``.hydra/`` subdirectory and no log file,
and nothing here opens TensorBoard, metrics, summary or checkpoint for writing.
"""

from __future__ import annotations

import logging
from collections.abc import Sized
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from resnet_exp.config import Config, EvalSplit, Mode
from resnet_exp.data import DataSource, is_streamed
from resnet_exp.errors import UserError
from resnet_exp.models import NetSpec
from resnet_exp.run.checkpoint import NO_RESUME, Checkpoint
from resnet_exp.run.records import write_json
from resnet_exp.run.result import RunResult, Status
from resnet_exp.run.runtime import autocast
from resnet_exp.train.context import RunContext
from resnet_exp.train.evaluation import evaluate_split
from resnet_exp.train.setup import prepare

log = logging.getLogger("resnet_exp")

EVAL = "eval.json"


class LoadedRun(NamedTuple):
    model: nn.Module  # the trained net, in eval mode
    config: Config  # the config the checkpoint was written with


def check_eval_command(args: list[str]) -> None:
    """Before Hydra starts (and creates a run directory): mode=eval names one run."""
    modes = [a.split("=", 1)[1] for a in args if a.startswith("mode=")]
    if not modes or modes[-1] != Mode.eval.value:
        return
    if "-m" in args or "--multirun" in args:
        raise UserError("mode=eval evaluates one run: drop -m and run it once per run directory")
    resumes = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not resumes or resumes[-1] in NO_RESUME:
        raise UserError("mode=eval needs resume=RUN_DIR (a run directory or its last.pt)")


def load_run(run: str | Path, device: str | torch.device = "cpu", trust: bool = False) -> LoadedRun:
    """A run's trained net (eval mode, on ``device``) and its config, from a run directory
    or a checkpoint file (``trust``: one of the older pickle format, which could run code,
    is read too: only a checkpoint from a source you trust).

    The net takes images normalised as in training: per channel, with the mean and
    std of the run's training images (``resnet_exp.data.load_dataset(cfg.data)``).
    """
    ckpt = Checkpoint.load(Checkpoint.locate(run, "load_run"), trust=trust)
    cfg = ckpt.run_config()  # the saved config, as it is: nothing to compare
    net = NetSpec.from_config(cfg.model, cfg.depth, is_streamed(cfg.data))
    fc = ckpt.state["model"].get("fc.weight")  # real data sets count their classes
    num_classes = fc.shape[0] if fc is not None else (cfg.data.num_classes or 10)
    model = net.build(num_classes)
    ckpt.load_weights(model, net)
    return LoadedRun(model.to(device).eval(), cfg)


def _split(choice: EvalSplit, data: DataSource) -> tuple[str, Sized]:
    if choice == EvalSplit.auto:
        return data.eval_name, data.eval_split
    if choice == EvalSplit.val:
        if data.val is None:
            raise UserError(
                "eval.split=val: this run holds out no validation images (data.val_size=0); "
                "use eval.split=test"
            )
        return "val", data.val
    return "test", data.test


def run_eval(cfg: Config, ctx: RunContext) -> RunResult:
    """mode=eval: evaluate ``cfg.resume``'s checkpoint; the result goes to RUN_DIR/eval.json.
    Builds only what it uses: the run's data (split, normalisation) and its net."""
    assert ctx.resume is not None  # the context loads and checks what mode=eval evaluates
    ckpt = ctx.resume.checkpoint
    data, model = prepare(cfg, ctx)
    ckpt.load_weights(model, ctx.net)
    name, split = _split(cfg.eval.split, data)
    ev, counts = evaluate_split(model, data, split, ctx.placement, ctx.precision, per_class=True)
    assert counts is not None
    wrong, count = counts
    per_class = {
        c: 100.0 * w / n if n else None
        for c, w, n in zip(data.classes, wrong.tolist(), count.tolist())
    }
    result = {
        "checkpoint": str(ckpt.path.resolve()),
        "step": ckpt.step,
        "split": name,
        "images": len(split),
        **ev,  # loss, error, top5_error (and per further test crop)
        "per_class_error": per_class,
        "per_class_images": dict(zip(data.classes, count.tolist())),
        "device": str(ctx.device),
        "precision": ctx.precision.value,
    }
    if cfg.eval.recalibrate_bn:
        result["recalibrated_bn"] = recalibrated(cfg, ctx, data, model, split)
    if ctx.world.is_main:
        _report(result, ckpt, ctx.run_dir / EVAL)
    return RunResult(Status.completed, result)


def recalibrated(
    cfg: Config, ctx: RunContext, data: DataSource, model: nn.Module, split: Sized
) -> dict[str, Any]:
    """The evaluation again after recomputing the batch-norm running statistics over
    ``eval.recalibrate_bn`` training batches (as training draws them, augmented), with
    torch's ``update_bn``: the statistics of the final weights rather than a moving
    average over the weights of the last steps (fb.resnet.torch's "recompute the BN
    statistics"). The checkpoint is not changed."""
    n = cfg.eval.recalibrate_bn
    loader = data.train_loader(cfg.data.batch_size // ctx.world.world, cfg.seed, ctx.placement)
    with autocast(ctx.device, ctx.precision):
        update_bn((loader.next()[0] for _ in range(n)), model)
    ev, _ = evaluate_split(model, data, split, ctx.placement, ctx.precision)
    return {"batches": n, **ev}


def _report(result: dict[str, Any], ckpt: Checkpoint, path: Path) -> None:
    """eval.json, and the same on the console."""
    write_json(path, result)
    name, images = result["split"], result["images"]
    print(
        f"{ckpt.path} (step {result['step']}): {name} split, {images} images | "
        f"loss {result['loss']:.4f} | top-1 error {result['error']:.2f}% | "
        f"top-5 error {result['top5_error']:.2f}%"
    )
    per_class = result["per_class_error"]
    width = max(len(c) for c in per_class)
    for c, err in per_class.items():
        cell = "no images" if err is None else f"{err:6.2f}%"
        print(f"  {c:<{width}}  {cell}  ({result['per_class_images'][c]} images)")
    again = result.get("recalibrated_bn")
    if again is not None:
        print(
            f"after recomputing the batch-norm statistics over {again['batches']} training "
            f"batches: loss {again['loss']:.4f} | top-1 error {again['error']:.2f}% | "
            f"top-5 error {again['top5_error']:.2f}%"
        )
    print(f"written to {path}")
