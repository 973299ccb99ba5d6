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
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from resnet_exp.config import Config, EvalSplit, Mode, flat_config
from resnet_exp.data import Split
from resnet_exp.errors import UserError
from resnet_exp.run.checkpoint import NO_RESUME, TRAINING, Checkpoint
from resnet_exp.run.records import write_json
from resnet_exp.run.result import RunResult, Status

log = logging.getLogger("resnet_exp")

EVAL = "eval.json"


class LoadedRun(NamedTuple):
    model: nn.Module  # the trained net, in eval mode
    config: Config  # the config the checkpoint was written with


def check_eval_args(args: list[str]) -> None:
    """Before Hydra starts (and creates a run directory): mode=eval names one run."""
    modes = [a.split("=", 1)[1] for a in args if a.startswith("mode=")]
    if not modes or modes[-1] != Mode.eval.value:
        return
    if "-m" in args or "--multirun" in args:
        raise UserError("mode=eval evaluates one run: drop -m and run it once per run directory")
    resumes = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not resumes or resumes[-1] in NO_RESUME:
        raise UserError("mode=eval needs resume=RUN_DIR (a run directory or its last.pt)")


def load_run(run: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A run's trained net (eval mode, on ``device``) and its config, from a run directory
    or a checkpoint file.

    The net takes images normalised as in training: per channel, with the mean and
    std of the run's training images (``resnet_exp.data.load_dataset(cfg.data)``).
    """
    from resnet_exp.train.setup import model_from_config

    ckpt = Checkpoint.load(Checkpoint.locate(run, "load_run"))
    cfg = ckpt.run_config()  # the saved config, as it is: nothing to compare
    fc = ckpt.state["model"].get("fc.weight")  # real data sets count their classes
    num_classes = fc.shape[0] if fc is not None else (cfg.data.num_classes or 10)
    model = model_from_config(cfg, num_classes)
    ckpt.load_weights(model, cfg)
    return LoadedRun(model.to(device).eval(), cfg)


def checkpoint_to_evaluate(cfg: Config) -> Checkpoint:
    """``cfg.resume``'s checkpoint, checked against ``cfg``: an evaluation trains
    nothing, so only the keys of how the net was trained (``TRAINING``) may differ."""
    if cfg.resume in NO_RESUME:
        raise UserError("mode=eval needs resume=RUN_DIR (a run directory or its last.pt)")
    ckpt = Checkpoint.load(Checkpoint.of_resume(str(cfg.resume)))
    ckpt.check_config(
        flat_config(cfg),
        doing="evaluate",
        asker="this command",
        hint="drop those overrides (the run's own settings come from its checkpoint)",
        allow=TRAINING,
    )
    return ckpt


def _split(choice: EvalSplit, data: Any) -> tuple[str, Split]:
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


def evaluate_run(cfg: Config, run_dir: Path) -> RunResult:
    """mode=eval: evaluate ``cfg.resume``'s checkpoint; the result goes to RUN_DIR/eval.json."""
    from resnet_exp.train.evaluation import evaluate
    from resnet_exp.train.setup import build_setup

    ckpt = checkpoint_to_evaluate(cfg)
    s = build_setup(cfg)  # the run's data (split, normalisation) and net, on this device
    ckpt.load_weights(s.model, cfg)
    name, split = _split(cfg.eval.split, s.data)
    ev, counts = evaluate(s, split, per_class=True)
    assert counts is not None
    wrong, count = counts
    per_class = {
        c: 100.0 * w / n if n else None
        for c, w, n in zip(s.data.classes, wrong.tolist(), count.tolist())
    }
    result = {
        "checkpoint": str(ckpt.path.resolve()),
        "step": ckpt.step,
        "split": name,
        "images": len(split),
        **ev,  # loss, error, top5_error (and per further test crop)
        "per_class_error": per_class,
        "per_class_images": dict(zip(s.data.classes, count.tolist())),
        "device": str(s.device),
        "precision": s.precision,
    }
    write_json(run_dir / EVAL, result)
    print(
        f"{ckpt.path} (step {result['step']}): {name} split, {len(split)} images | "
        f"loss {ev['loss']:.4f} | top-1 error {ev['error']:.2f}% | top-5 error {ev['top5_error']:.2f}%"
    )
    width = max(len(c) for c in s.data.classes)
    for c, err in per_class.items():
        cell = "no images" if err is None else f"{err:6.2f}%"
        print(f"  {c:<{width}}  {cell}  ({result['per_class_images'][c]} images)")
    print(f"written to {run_dir / EVAL}")
    return RunResult(Status.completed, result)
