"""An exported run: the folder a trained net is shared in, written and read here alone.

The layout model hubs keep a model in (``resnet-exp-export`` writes it)::

    model.safetensors  the net's weights and batch-norm statistics: tensors only
    config.json        the net's settings (to build it again) and the input it expects
    README.md          the model card: the run's recipe, final errors, seed, step, versions
    model.onnx         with --onnx: the same net for ONNX runtimes

Nothing here runs code a file brings: safetensors holds tensors and a JSON header,
config.json is JSON, and a run folder's last.pt is read by ``Checkpoint.load`` alone (its
safe loading: weights and plain containers, no pickled objects). A file from someone
else can at worst fail to load.

``read_weights`` is the one reader of weights by path (an export folder, a run folder,
its last.pt or a .safetensors file); ``strip_prefixes`` removes what a wrapper added to
the names (DDP's ``module.``, torch.compile's ``_orig_mod.``), for any other reader too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from resnet_exp.config import Config
from resnet_exp.errors import UserError
from resnet_exp.models import NetOptions, NetSpec, ResNet, ShortcutSpec, build_model
from resnet_exp.run.checkpoint import CHECKPOINT, Checkpoint

WEIGHTS, CONFIG, CARD, ONNX = "model.safetensors", "config.json", "README.md", "model.onnx"
FORMAT, FORMAT_VERSION = "resnet-exp-export", 1
# What wrappers put before every name of a net's state dict: DistributedDataParallel and
# DataParallel (module.), torch.compile (_orig_mod.); nested wrappers stack them.
PREFIXES = ("module.", "_orig_mod.")
# config.json's "net": build_model's arguments, every default resolved (a later resnet-exp
# with other defaults builds the same net), and the fidelity options (NetOptions' fields:
# one an older export lacks keeps its default, the authors' code's choice).
SHAPE_KEYS = ("block", "depth", "family", "unit", "downsample", "width", "shortcut", "num_classes")
OPTION_KEYS = tuple(f.name for f in fields(NetOptions))
ACCEPTS = "an export folder (config.json, model.safetensors), a run folder (last.pt) or a .safetensors file"

StateDict = dict[str, torch.Tensor]


# --- names ------------------------------------------------------------------------------


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the wrappers' prefixes (``PREFIXES``) removed: those every name
    carries, however nested (``_orig_mod.module.conv.weight`` -> ``conv.weight``).
    A copy: the caller's dict is left as it is."""
    out = dict(state)
    while out:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in out)), None)
        if prefix is None:
            break
        consume_prefix_in_state_dict_if_present(out, prefix)  # torch's own, as DDP's users do
    return out


# --- the net's settings -----------------------------------------------------------------


def net_settings(cfg: Config, num_classes: int) -> dict[str, Any]:
    """The settings of the net a run's config describes, every ``auto`` and default
    resolved (the run's family, unit, shortcut of reshaping units and width)."""
    from resnet_exp.data import is_streamed

    net = NetSpec.from_config(cfg.model, cfg.depth, is_streamed(cfg.data))
    options = {f.name: getattr(net.options, f.name) for f in fields(NetOptions)}
    return {
        "block": net.block.value,
        "depth": net.depth,
        "family": net.family.value,
        "unit": net.unit.value,
        "downsample": net.downsample.value,
        "width": net.width,
        "shortcut": {**asdict(net.shortcut), "name": net.shortcut.name.value},
        **{k: getattr(v, "value", v) for k, v in options.items()},
        "num_classes": num_classes,
    }


def build_net(settings: dict[str, Any], where: str = CONFIG) -> ResNet:
    """The net ``settings`` (config.json's "net") describe; a missing, unknown or bad
    setting is a one-line UserError naming ``where`` it came from."""
    missing = [k for k in SHAPE_KEYS if k not in settings]
    unknown = sorted(set(settings) - {*SHAPE_KEYS, *OPTION_KEYS})
    if missing or unknown:
        raise UserError(
            f"{where}: the net's settings lack {missing or 'nothing'} and have unknown "
            f"{unknown or 'none'}; expected {', '.join((*SHAPE_KEYS, *OPTION_KEYS))}"
        )
    s = settings
    try:
        shortcut = ShortcutSpec(**s["shortcut"])
        options = {k: s[k] for k in OPTION_KEYS if k in s}
        return build_model(
            s["block"],
            int(s["depth"]),
            int(s["num_classes"]),
            s["unit"],
            s["downsample"],
            int(s["width"]),
            shortcut=shortcut,
            family=s["family"],
            **options,
        )
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:  # a setting of the wrong type or shape
        raise UserError(f"{where}: the net's settings do not build a net ({e})") from None


def load_into(model: nn.Module, state: StateDict, where: str | Path) -> None:
    """Load ``state`` (prefixes stripped) into ``model``; weights of another net are a
    one-line UserError (torch lists every key over many lines)."""
    state = strip_prefixes(state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        ours = model.state_dict()
        missing = [k for k in ours if k not in state]
        extra = [k for k in state if k not in ours]
        shaped = [k for k in ours if k in state and ours[k].shape != state[k].shape]
        first = (shaped or missing or extra or ["?"])[0]
        raise UserError(
            f"{where} holds weights of another net than its settings describe: "
            f"{len(missing)} tensors missing, {len(extra)} unexpected, {len(shaped)} of "
            f"another shape (first: {first})"
        ) from e


# --- reading ----------------------------------------------------------------------------


def is_export(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_config(folder: Path) -> dict[str, Any]:
    """An export folder's config.json, checked to be one resnet-exp wrote."""
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f'{path} is not a resnet-exp export\'s config (no "format": "{FORMAT}")')
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {config.get('format_version')!r}; this resnet-exp reads "
            f"{FORMAT_VERSION} (a newer resnet-exp wrote it?)"
        )
    if not isinstance(config.get("net"), dict):
        raise UserError(f'{path} has no "net" settings')
    return config


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def _checkpoint(path: Path, trust: bool) -> Checkpoint:
    return Checkpoint.load(Checkpoint.locate(path, "weights", ACCEPTS), trust=trust)


def read_weights(path: str | Path, trust: bool = False) -> StateDict:
    """A net's state dict (on the CPU, wrappers' prefixes stripped) from an export
    folder, a run folder, its last.pt or a .safetensors file (``trust``: a checkpoint of
    the older pickle format, which could run code, is read too)."""
    path = Path(path)
    if is_export(path):
        return strip_prefixes(_read_safetensors(path / WEIGHTS))
    if path.is_file() and path.suffix == ".safetensors":
        return strip_prefixes(_read_safetensors(path))
    if (path.is_dir() and (path / CHECKPOINT).is_file()) or path.is_file():
        return strip_prefixes(_checkpoint(path, trust).state["model"])
    raise UserError(f"{path} is not {ACCEPTS}")


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", trust: bool = False
) -> nn.Module:
    """The trained net in eval mode on ``device``, from an export folder (config.json and
    model.safetensors) or a run folder (or its last.pt); weights saved from a DDP-wrapped or
    compiled net load too. Its input: RGB in [0, 1], normalised per channel with config.json's
    "input" mean and std (a run folder: its summary.json's data_mean and data_std).
    ``trust``: a run folder's checkpoint of the older pickle format is read too."""
    path = Path(path)
    if is_export(path):
        settings, where = read_config(path)["net"], path / CONFIG
        state = _read_safetensors(path / WEIGHTS)
    elif path.suffix == ".safetensors":
        raise UserError(
            f"{path} holds weights but not the net's settings: pass its export folder "
            f"(with config.json), or read the weights alone with read_weights"
        )
    elif (path.is_dir() and (path / CHECKPOINT).is_file()) or path.is_file():
        ckpt = _checkpoint(path, trust)
        state, where, cfg = ckpt.state["model"], ckpt.path, ckpt.run_config()
        settings = net_settings(cfg, num_classes(state, cfg))
    else:
        raise UserError(
            f"load_pretrained: {path} is neither an export folder (config.json, "
            f"model.safetensors) nor a run folder (last.pt)"
        )
    model = build_net(settings, str(where))
    load_into(model, state, where)
    return model.to(device).eval()


def num_classes(state: StateDict, cfg: Config) -> int:
    """The classifier's outputs, as the weights have them (real data sets count their
    classes at load time; a config holds the count for synthetic data only)."""
    fc = strip_prefixes(state).get("fc.weight")
    return int(fc.shape[0]) if fc is not None else int(cfg.data.num_classes or 10)


# --- writing ----------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """An export goes into a new or empty folder: nothing of another export is mixed in."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; pass a new folder")


def save_weights(state: StateDict, path: Path) -> None:
    """The state dict as safetensors (its own contiguous CPU copies: a channels-last
    net's convolution weights are strided, which safetensors does not store). Written by
    Python, not safetensors' save_file: that one makes the file readable by its owner only."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in strip_prefixes(state).items()}
    path.write_bytes(save(tensors, metadata={"format": "pt"}))  # "pt": as hubs tag torch's


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write the export into; renamed to ``out``
    when the block ends, removed (with any parent folder made for it) when it raises:
    a failure leaves no half-written export."""
    check_out(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    os.mkdir(tmp)  # the umask's permissions, as for the user's other folders
    try:
        yield tmp
        os.replace(tmp, out)  # an empty ``out`` is replaced; check_out refused a full one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
