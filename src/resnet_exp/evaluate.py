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
from omegaconf import OmegaConf
from torch import nn

from resnet_exp.config import Config, EvalSplit, Mode, flat_config, flatten
from resnet_exp.data import Split
from resnet_exp.errors import UserError
from resnet_exp.models import resolve_unit
from resnet_exp.train.checkpoint import CHECKPOINT, load_checkpoint
from resnet_exp.train.records import write_json
from resnet_exp.train.resume import (
    NET_AND_DATA,
    NO_RESUME,
    checkpoint_path,
    differences,
    matches,
)

log = logging.getLogger("resnet_exp")

EVAL = "eval.json"
NOT_MATCHED = ("model.checkpointing",)  # how the net trains, not what it computes


class LoadedRun(NamedTuple):
    model: nn.Module  # the trained net, in eval mode
    config: Config  # the config the checkpoint was written with


def _net_keys(flat: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in flat.items() if matches(k, NET_AND_DATA) and not matches(k, NOT_MATCHED)
    }


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


def check_config_matches(saved: dict[str, Any], flat: dict[str, Any], path: Path) -> None:
    """Refuse a config whose net or data differs from the one the checkpoint was trained on."""
    changed = differences(_net_keys(flatten(saved)), _net_keys(flat))
    if changed:
        was, now = changed
        raise UserError(
            f"cannot evaluate {path}: it was trained with {was}, this command asks for {now}; "
            f"drop those overrides (the run's own settings come from its checkpoint)"
        )


def load_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], path: Path, cfg: Config
) -> None:
    """Load the checkpoint's weights; weights of another net are a one-line UserError."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # torch lists every key over many lines
        ours = model.state_dict()
        missing = [k for k in ours if k not in weights]
        extra = [k for k in weights if k not in ours]
        shaped = [k for k in ours if k in weights and ours[k].shape != weights[k].shape]
        first = (shaped or missing or extra or ["?"])[0]
        raise UserError(
            f"{path} holds weights of another net than its config describes "
            f"(depth={cfg.depth}, block={cfg.model.block.value}, "
            f"unit={resolve_unit(cfg.depth, cfg.model.unit.value)[0]}): "
            f"{len(missing)} tensors missing, {len(extra)} unexpected, {len(shaped)} of another "
            f"shape (first: {first}); was the checkpoint replaced or written by another net?"
        ) from e


def _saved_config(state: dict[str, Any], path: Path) -> dict[str, Any]:
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{path} keeps no config (written by an older resnet-exp); cannot load it")
    return saved


def load_run(run: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A run's trained net (eval mode, on ``device``) and its config, from a run directory
    or a checkpoint file.

    The net takes images normalised as in training: per channel, with the mean and
    std of the run's training images (``resnet_exp.data.load_dataset(cfg.data)``).
    """
    from resnet_exp.train.setup import model_from_config

    path = Path(run) / CHECKPOINT if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise UserError(f"load_run: {path} does not exist (pass a run directory or its last.pt)")
    state = load_checkpoint(path)
    tree = OmegaConf.merge(OmegaConf.structured(Config), _saved_config(state, path))
    cfg: Config = OmegaConf.to_object(tree)  # type: ignore[assignment]
    weights = state["model"]
    fc = weights.get("fc.weight")  # real data sets count their classes; the weights know
    num_classes = fc.shape[0] if fc is not None else (cfg.data.num_classes or 10)
    model = model_from_config(cfg, num_classes)
    load_weights(model, weights, path, cfg)
    return LoadedRun(model.to(device).eval(), cfg)


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


def evaluate_run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """mode=eval: evaluate ``cfg.resume``'s checkpoint; the result goes to RUN_DIR/eval.json."""
    from resnet_exp.train.evaluation import evaluate
    from resnet_exp.train.setup import build_setup

    if cfg.resume in NO_RESUME:
        raise UserError("mode=eval needs resume=RUN_DIR (a run directory or its last.pt)")
    path = checkpoint_path(str(cfg.resume))
    state = load_checkpoint(path)
    check_config_matches(_saved_config(state, path), flat_config(cfg), path)
    s = build_setup(cfg)  # the run's data (split, normalisation) and net, on this device
    load_weights(s.model, state["model"], path, cfg)
    name, split = _split(cfg.eval.split, s.data)
    ev, counts = evaluate(s, split, per_class=True)
    assert counts is not None
    wrong, count = counts
    per_class = {
        c: 100.0 * w / n if n else None
        for c, w, n in zip(s.data.classes, wrong.tolist(), count.tolist())
    }
    result = {
        "checkpoint": str(path.resolve()),
        "step": state["step"],
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
        f"{path} (step {result['step']}): {name} split, {len(split)} images | "
        f"loss {ev['loss']:.4f} | top-1 error {ev['error']:.2f}% | top-5 error {ev['top5_error']:.2f}%"
    )
    width = max(len(c) for c in s.data.classes)
    for c, err in per_class.items():
        cell = "no images" if err is None else f"{err:6.2f}%"
        print(f"  {c:<{width}}  {cell}  ({result['per_class_images'][c]} images)")
    print(f"written to {run_dir / EVAL}")
    return result
