"""The ``resnet-exp-export`` command: a trained run as a folder others can load.

``resnet-exp-export RUN_DIR [--out DIR] [--onnx] [--allow-unfinished]`` writes
``model.safetensors``, ``config.json`` and a ``README.md`` model card (the folder's
contract: ``resnet_exp.run.export``), by default into RUN_DIR/export. Bad input (no
such run, not a run, an output folder that holds files, an unfinished run without
--allow-unfinished) is one line and exit 2, with nothing written; the export is
written beside its place and renamed into it, so a failure leaves none half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet_exp.config import Config
from resnet_exp.errors import UserError
from resnet_exp.run import export as ex
from resnet_exp.run.checkpoint import CHECKPOINT, Checkpoint
from resnet_exp.run.records import SUMMARY
from resnet_exp.run.result import Status, SummaryKey

PROG = "resnet-exp-export"
DEFAULT_OUT = "export"  # RUN_DIR/export
# The largest |ONNX - eager| logit difference an export may have, times the largest logit
# where that is over 1: fp32 itself is no closer (a 2-step ResNet-110's logits reach 4e3,
# and its eager fp32 and fp64 logits differ by 2.4e-3; its ONNX export's by 2.4e-3 too).
ONNX_TOLERANCE = 1e-4
ONNX_CHECK_IMAGES = 8
ONNX_EXTRA = "pip install 'resnet-exp[onnx]'"
# summary.json's record of the input normalisation (train/setup.py's describe)
MEAN, STD = "data_mean", "data_std"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a trained run as a folder others can load: model.safetensors "
        "(weights only), config.json (the net's settings and the input it expects) and a "
        "README.md model card (recipe, final errors, seed, step).",
    )
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="a run directory (with last.pt)")
    p.add_argument(
        "-o", "--out", type=Path, help=f"a new or empty folder (default: RUN_DIR/{DEFAULT_OUT})"
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help=f"also model.onnx, checked against the net with onnxruntime (needs {ONNX_EXTRA})",
    )
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="export a run that did not complete (its card says so)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out, onnx = export_run(args.run, args.out, args.onnx, args.allow_unfinished)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if onnx is not None:
        print(
            f"{ex.ONNX}: max |ONNX - eager| logit difference {onnx['max_abs_diff']:.3g} "
            f"(onnxruntime; largest logit {onnx['max_abs_logit']:.3g})"
        )
    print(out)


def export_run(
    run: Path, out: Path | None, onnx: bool = False, allow_unfinished: bool = False
) -> tuple[Path, dict[str, Any] | None]:
    """Export ``run`` into ``out``; the folder and, with ``onnx``, the ONNX file's check
    against the net (``write_onnx``). Every check of the input comes before any write."""
    run = check_run(run)
    out = out if out is not None else run / DEFAULT_OUT
    ex.check_out(out)
    if onnx:
        require_onnx()
    summary = read_summary(run)
    status = Status.of(summary)
    if status is not Status.completed and not allow_unfinished:
        raise UserError(
            f"{run} did not complete (status {status.value}); pass --allow-unfinished to "
            f"export it anyway (its card then says so)"
        )
    ckpt = Checkpoint.load(run / CHECKPOINT)
    cfg = ckpt.run_config()
    state = ex.strip_prefixes(ckpt.state["model"])
    net = ex.net_settings(cfg, ex.num_classes(state, cfg))
    model = ex.build_net(net, str(ckpt.path))
    ex.load_into(model, state, ckpt.path)  # the weights are the net's before anything is written
    model.eval()
    mean, std = normalisation(run, summary, cfg)
    config = export_config(net, input_spec(cfg, mean, std), run, ckpt.step, status)
    with ex.staged(out) as tmp:
        ex.save_weights(state, tmp / ex.WEIGHTS)
        if onnx:
            config["onnx"] = write_onnx(model, tmp / ex.ONNX, cfg.data.image_size)
        ex.write_json(tmp / ex.CONFIG, config)
        (tmp / ex.CARD).write_text(model_card(cfg, summary, config))
    return out, config.get("onnx")


# --- the run ----------------------------------------------------------------------------


def check_run(run: Path) -> Path:
    if not run.exists():
        raise UserError(f"{run} does not exist (pass a run directory, the folder with last.pt)")
    if not run.is_dir() or not (run / CHECKPOINT).is_file():
        raise UserError(f"{run} is not a run directory: it holds no {CHECKPOINT}")
    return run


def read_summary(run: Path) -> dict[str, Any]:
    """summary.json (none: the run is unfinished, killed or still running)."""
    path = run / SUMMARY
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
        Status.of(summary)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a resnet-exp summary ({e})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} is not a resnet-exp summary (not a JSON object)")
    return summary


def _channels(value: Any) -> list[float] | None:
    ok = isinstance(value, list) and len(value) == 3
    return [float(v) for v in value] if ok and all(_positive_or_zero(v) for v in value) else None


def _positive_or_zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


def normalisation(run: Path, summary: dict[str, Any], cfg: Config) -> tuple[list, list]:
    """The per-channel mean and std the net's inputs were normalised with: as the run
    recorded them, else (a run from before they were recorded) from its data set."""
    mean, std = _channels(summary.get(MEAN)), _channels(summary.get(STD))
    if mean is not None and std is not None:
        return mean, std
    from resnet_exp.data import is_streamed, load_dataset

    if is_streamed(cfg.data):  # streamed images are always normalised with ImageNet's
        from resnet_exp.data.augment import IMAGENET_MEAN, IMAGENET_STD

        return list(IMAGENET_MEAN), list(IMAGENET_STD)

    data = replace(cfg.data, download=False)  # the copy the run trained on, or none
    try:
        source = load_dataset(data)
    except (UserError, OSError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{run / SUMMARY} records no {MEAN}/{STD} (written before resnet-exp recorded "
            f"them) and the run's data set ({cfg.data.name} in data.root={cfg.data.root!r}) "
            f"is not here to compute them from: {first}"
        ) from None
    return [float(v) for v in source.mean], [float(v) for v in source.std]


# --- what config.json says --------------------------------------------------------------


def input_spec(cfg: Config, mean: list[float], std: list[float]) -> dict[str, Any]:
    """The images the net expects: RGB, ``image_size`` square, in [0, 1], then
    ``(x - mean) / std`` per channel; how the run's test images were brought to that size."""
    from resnet_exp.data import is_streamed

    d = cfg.data
    size = d.image_size
    if is_streamed(d):  # shorter side to crop / ratio (256 for 224), centre crop
        resize = {"shorter_side": round(size / d.eval_crop_ratio), "center_crop": size}
        resize["interpolation"] = d.interpolation.value
    elif d.name == "imagefolder":  # decoded once: shorter side to the size, centre crop
        resize = {"shorter_side": size, "center_crop": size, "interpolation": "bilinear"}
    else:
        resize = None  # CIFAR and synthetic images are used at their size
    return {
        "channels": "RGB",
        "image_size": size,
        "scale": "uint8 / 255",
        "mean": mean,
        "std": std,
        "resize": resize,
    }


def export_config(
    net: dict[str, Any], inputs: dict[str, Any], run: Path, step: int, status: Status
) -> dict[str, Any]:
    from resnet_exp.version import __version__

    return {
        "format": ex.FORMAT,
        "format_version": ex.FORMAT_VERSION,
        "net": net,
        "input": inputs,
        "source": {"run": run.resolve().name, "step": step, "status": status.value},
        "resnet_exp_version": __version__,
        "torch_version": torch.__version__,
    }


# --- ONNX -------------------------------------------------------------------------------


def require_onnx() -> None:
    """--onnx needs the onnx extra: torch's exporter (onnxscript) and onnxruntime."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if _absent(importlib.util, m)]
    if missing:
        raise UserError(f"--onnx needs {', '.join(missing)}: {ONNX_EXTRA}")


def _absent(util: Any, module: str) -> bool:
    try:
        return util.find_spec(module) is None
    except (ImportError, ValueError):  # a module set to None in sys.modules
        return True


def write_onnx(model: nn.Module, path: Path, image_size: int) -> dict[str, Any]:
    """Export with torch's exporter (the torch.export-based one: ``dynamo=True``), batch
    size free; run it with onnxruntime on random images, compare with the eager net: the
    largest logit difference, the largest logit and the tolerance (``ONNX_TOLERANCE``)
    they were held to. Over it the export is refused."""
    import onnxruntime

    model = model.float().eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, image_size, image_size, generator=gen)
    batch = torch.export.Dim("batch")
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        program.save(str(path))
    except Exception as e:  # the exporter's errors are many and long
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"torch.onnx.export failed: {type(e).__name__}: {first}") from None
    images = torch.randn(ONNX_CHECK_IMAGES, 3, image_size, image_size, generator=gen)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = model(images)
    diff = float((torch.from_numpy(got) - want).abs().max())
    largest = float(want.abs().max())
    tolerance = ONNX_TOLERANCE * max(1.0, largest)
    if not diff <= tolerance:  # NaN too
        raise UserError(
            f"the ONNX export differs from the net by {diff:.3g} in the logits (more than "
            f"{tolerance:.3g}: {ONNX_TOLERANCE:g} x the largest logit, {largest:.3g}, or 1); "
            f"nothing was written"
        )
    check = {"max_abs_diff": diff, "max_abs_logit": largest, "tolerance": tolerance}
    return {"file": ex.ONNX, "checked_images": ONNX_CHECK_IMAGES, **check}


# --- the model card ---------------------------------------------------------------------


def model_card(cfg: Config, summary: dict[str, Any], config: dict[str, Any]) -> str:
    """README.md: what the net is, what it expects, how it was trained, how it did."""
    net, source = config["net"], config["source"]
    title = f"{net['block']} ResNet-{net['depth']} ({net['family']}, {net['unit']} units)"
    parts = [
        _front_matter(cfg, net),
        f"# {title} on {cfg.data.name}\n",
        _unfinished(summary, source) if source["status"] != Status.completed.value else "",
        f"Exported from the resnet-exp run `{source['run']}` at step {source['step']} with "
        f"resnet-exp {config['resnet_exp_version']} (torch {config['torch_version']}).\n",
        _table("Net", _net_rows(net)),
        _input(config["input"]),
        _table("Training recipe", _recipe_rows(cfg, summary)),
        _table("Final errors (%)", _error_rows(summary)),
        _use(config.get("onnx")),
    ]
    return "\n".join(p for p in parts if p)


def _front_matter(cfg: Config, net: dict[str, Any]) -> str:
    tags = ["image-classification", "resnet", "resnet-exp", net["block"], cfg.data.name]
    lines = ["---", "library_name: resnet-exp", "pipeline_tag: image-classification", "tags:"]
    return "\n".join([*lines, *(f"- {t}" for t in tags), "---", ""])


def _unfinished(summary: dict[str, Any], source: dict[str, Any]) -> str:
    done, steps = summary.get(SummaryKey.steps_done), summary.get(SummaryKey.steps)
    where = f"step {done} of {steps}" if done is not None else f"step {source['step']}"
    return (
        f"> **Unfinished run** (status `{source['status']}`, {where}): these weights are "
        f"not the result of the recipe below, exported with --allow-unfinished.\n"
    )


def _table(title: str, rows: list[tuple[str, Any]]) -> str:
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## {title}\n\n| | |\n|---|---|\n{body}\n" if rows else ""


def _net_rows(net: dict[str, Any]) -> list[tuple[str, Any]]:
    shortcut = net["shortcut"]
    rows = [(k, net[k]) for k in ("block", "depth", "family", "unit", "downsample", "width")]
    rows.append(("shortcut", shortcut["name"]))
    rows += [(k, net[k]) for k in ex.OPTION_KEYS]
    return [*rows, ("classes", net["num_classes"])]


def _input(spec: dict[str, Any]) -> str:
    resize = spec["resize"]
    how = (
        f"shorter side resized to {resize['shorter_side']} ({resize['interpolation']}), "
        f"centre crop {resize['center_crop']}"
        if resize
        else "used at their size"
    )
    size = spec["image_size"]
    return (
        f"## Input\n\nRGB images of {size}x{size} ({how}), scaled to [0, 1], then "
        f"normalised per channel: `(x - mean) / std` with\nmean = {spec['mean']},\n"
        f"std = {spec['std']}\n(the run's training images; config.json's \"input\").\n"
    )


def _recipe_rows(cfg: Config, s: dict[str, Any]) -> list[tuple[str, Any]]:
    o, sch, t, d = cfg.optimizer, cfg.schedule, cfg.trainer, cfg.data
    optimizer = f"{o.name.value}, lr {o.lr:g}, weight decay {o.weight_decay:g}"
    optimizer += f", momentum {o.momentum:g}" + (" (Nesterov)" if o.nesterov else "")
    if o.name.value == "adamw":
        optimizer = f"adamw, lr {o.lr:g}, weight decay {o.weight_decay:g}, betas {o.betas}"
    warmup = s.get("warmup", sch.warmup)
    schedule = f"{sch.name.value}, warm-up {'on' if warmup in (True, 'true') else warmup}"
    if warmup is False:
        schedule = f"{sch.name.value}, no warm-up"
    if sch.name.value == "paper":
        schedule += f", x{sch.gamma:g} at {sch.milestones} ({sch.milestone_unit.value})"
    per_epoch = s.get("steps_per_epoch", "?")
    length = f"{t.max_steps} steps ({per_epoch} an epoch)"
    if t.max_steps is None:
        length = f"{t.epochs} epochs of {per_epoch} steps = {s.get(SummaryKey.steps, '?')} steps"
    data = f"{d.name}, {s.get('train_images', '?')} training images"
    data += f" ({d.val_size} held out)" if d.val_size else ""
    data += f", augmentation {'pad-' + str(d.pad) + ' crop + flip' if d.augment else 'off'}"
    return [
        ("data set", data),
        ("optimizer", optimizer),
        ("schedule", schedule),
        ("length", length),
        ("steps done", s.get(SummaryKey.steps_done, "?")),
        ("batch", f"{d.batch_size} (global, {s.get('processes', 1)} process(es))"),
        ("precision", s.get("precision", t.precision.value)),
        ("seed", cfg.seed),
    ]


def _error_rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every error the run's summary holds: the last evaluation's, the test set's at the
    end (with a validation split), the best scheduled evaluation's, the training loss's."""
    keys = [k for k in s if k.endswith("error") or "_error_" in k]
    return [(k, f"{s[k]:.2f}") for k in keys if isinstance(s[k], (int, float))]


def _use(onnx: dict[str, Any] | None) -> str:
    text = (
        "## Use\n\n```python\nimport resnet_exp\n\n"
        'net = resnet_exp.load_pretrained("path/to/this/folder")  # eval mode, on the CPU\n'
        "logits = net(images)  # images as under Input\n```\n\n"
        "The weights alone: `resnet_exp.read_weights(folder)`.\n"
    )
    if onnx is not None:
        text += (
            f"\n`{ex.ONNX}` (input `images`, output `logits`, any batch size) was checked "
            f"with onnxruntime on {onnx['checked_images']} random images: its logits are "
            f"within {onnx['max_abs_diff']:.3g} of the PyTorch net's (largest logit "
            f"{onnx['max_abs_logit']:.3g}).\n"
        )
    return text
