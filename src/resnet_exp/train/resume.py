"""What a resumed run must keep from its checkpoint, and what it may change.

A checkpoint stores the run's full config and the overrides it was started
with. ``resume=PATH`` reuses those overrides (so ``resnet-exp resume=DIR`` alone
continues the run as it was), and overrides given with it take precedence:
a longer run or another logging interval is allowed and logged; another model,
data set, batch or seed is refused with the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from resnet_exp.config import Config
from resnet_exp.errors import UserError
from resnet_exp.train.checkpoint import checkpoint_path, load_checkpoint

log = logging.getLogger("resnet_exp")

# The weights and the data order depend on these: changing one makes the
# continuation another experiment. (A prefix covers every key below it.)
FIXED = (
    "model",
    "depth",
    "seed",
    "mode",
    "data.name",
    "data.image_size",
    "data.train_limit",
    "data.val_size",
    "data.num_classes",
    "data.synthetic_train",
    "data.stream",
    "data.batch_size",
    "data.augment",
    "data.pad",
    "optimizer.name",
    "schedule.name",
)
# How to run, not what: never compared, never inherited.
NOT_INHERITED = (
    "resume",
    "dry_run",
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra.output_subdir",
)
NO_RESUME = (None, "", "auto", "none", "null")


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"model.block": "preact", ...}``: the resolved config as dotted keys."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return flatten(tree)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(flat: dict[str, Any]) -> dict[str, Any]:
    """The part of the config a checkpoint's weights and data order depend on."""
    return {k: v for k, v in flat.items() if _matches(k, FIXED)}


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(state: dict[str, Any], flat: dict[str, Any], path: Path) -> list[str]:
    """Raise UserError if the config changes what the checkpoint was trained on.

    Returns the allowed changes as ``key: old -> new`` lines, for the log.
    """
    saved = flatten(state.get("config") or {})
    fp = fingerprint(flat)
    if not saved:  # only the hash to go by
        if state.get("fingerprint_hash") != fingerprint_hash(fp):
            raise UserError(
                f"cannot resume from {path}: it was trained with another model or data "
                f"config (its config hash differs); start a new run"
            )
        return []
    old = fingerprint(saved)
    keys = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
    if keys:
        was = ", ".join(f"{k}={old.get(k)}" for k in keys)
        now = ", ".join(f"{k}={fp.get(k)}" for k in keys)
        raise UserError(
            f"cannot resume from {path}: it was trained with {was}, this run asks for {now}; "
            f"resume with the run's own values or start a new run"
        )
    return [
        f"{k}: {saved.get(k)} -> {flat.get(k)}"
        for k in sorted(set(saved) | set(flat))
        if not _matches(k, NOT_INHERITED) and saved.get(k) != flat.get(k)
    ]


def resumable_overrides(overrides: list[str]) -> list[str]:
    """The overrides a checkpoint keeps for ``resume=PATH`` to start from."""
    return [o for o in overrides if not _matches(_override_key(o), NOT_INHERITED)]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_inherited_overrides(args: list[str]) -> list[str]:
    """Command-line arguments with ``resume=PATH``'s saved overrides put in front.

    Keys given on this command line win; a sweep (``-m``) inherits nothing
    (its jobs resume with ``resume=auto``).
    """
    if "-m" in args or "--multirun" in args:
        return args
    at = [i for i, a in enumerate(args) if a.startswith("resume=")]
    if not at or args[at[-1]].split("=", 1)[1] in NO_RESUME:
        return args
    path = checkpoint_path(args[at[-1]].split("=", 1)[1])
    saved = load_checkpoint(path, mmap=True).get("overrides", [])
    given = {_override_key(a) for a in args if "=" in a and not a.startswith("-")}
    inherited = [o for o in resumable_overrides(saved) if _override_key(o) not in given]
    # Overrides must stay one contiguous run of positional arguments for argparse.
    first = min(i for i, a in enumerate(args) if "=" in a and not a.startswith("-"))
    return args[:first] + inherited + args[first:]
