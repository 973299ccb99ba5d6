"""A run's checkpoint, ``last.pt``: where it is, what it holds, whether a config may use it.

``Checkpoint`` is the one place that knows the file's keys. The trainer writes
one (atomically: a crash mid-write never leaves a broken last.pt); a resume, an
evaluation and ``load_run`` read one. A checkpoint keeps the config it was
trained with, and ``check_config`` holds another config against it by one rule:

- the keys of ``NET_AND_DATA`` (what the net computes, which images its splits
  hold) and ``TRAINING`` (what else the weights and the data order depend on)
  must match, except those the caller allows to differ: a resume allows none,
  an evaluation allows ``TRAINING`` (it trains nothing);
- ``HOW_TO_RUN`` keys never need to: ``model.checkpointing`` recomputes
  activations in the backward pass with the same gradients and batch-norm
  statistics (tests/test_models.py), a trade of speed for memory like the
  device, so a resume may change it (the change is logged) and so may an
  evaluation;
- ``load_run`` compares nothing: it takes the saved config as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from resnet_exp.config import STREAMED, Config, added_settings, flatten
from resnet_exp.errors import UserError
from resnet_exp.models import NetSpec

log = logging.getLogger("resnet_exp")

CHECKPOINT = "last.pt"
# last.pt's format. 2: every entry loads with torch.load(weights_only=True) (tensors, plain
# containers) and says where it was made; 1 (no "schema" key): a pickle of Python objects.
SCHEMA = 2
# What a checkpoint needs for an exact continuation (see train/loop.py, run/resume.py).
REQUIRED = ("model", "optimizer", "scheduler", "scaler", "loader", "rng", "step")
# ``resume=`` values that mean "start a new run"; ``auto`` continues this run
# directory's last.pt when there is one.
NO_RESUME = (None, "", "none", "null")
AUTO = "auto"

# What the net computes and which images its splits hold. (A prefix covers every key below it.)
NET_AND_DATA = (
    "model",
    "depth",
    "data.name",
    "data.image_size",
    "data.train_limit",
    "data.val_size",
    "data.num_classes",
    "data.synthetic_train",
    "data.stream",
)
# What the weights and the data order depend on besides: changing one makes a
# continuation another experiment, but not the net that is evaluated.
TRAINING = (
    "seed",
    "mode",
    "data.batch_size",
    "data.augment",
    "data.pad",
    "data.pad_value",
    "data.interpolation",
    "optimizer.name",
    "schedule.name",
    # beyond the paper's recipe (docs/fidelity.md)
    "trainer.label_smoothing",
    "trainer.ema",
    "data.cutout",
    "data.mixup_alpha",
    "data.cutmix_alpha",
)
HOW_TO_RUN = ("model.checkpointing",)  # under a matched prefix, but never matched


def matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def fingerprint(flat: dict[str, Any], allow: tuple[str, ...] = ()) -> dict[str, Any]:
    """The part of a config a checkpoint's use depends on, but for the keys in ``allow``.

    A setting added after a checkpoint was written (``config.since``) counts with the
    value that reproduces the older behaviour when the config lacks it, and not at all
    where it does not act on the run (interpolation on in-memory CIFAR)."""
    added = added_settings()
    flat = {**{k: a["before"] for k, a in added.items()}, **flat}
    return {
        k: v
        for k, v in flat.items()
        if matches(k, (*NET_AND_DATA, *TRAINING))
        and not matches(k, (*HOW_TO_RUN, *allow))
        and (k not in added or _acts(added[k]["acts"], flat))
    }


def _acts(where: str | None, flat: dict[str, Any]) -> bool:
    """Whether a setting that acts only ``where`` acts on the run ``flat`` describes."""
    if where == STREAMED:
        name = flat.get("data.name")
        return name == "imagenet" or (name == "imagefolder" and bool(flat.get("data.stream")))
    return True


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str] | None:
    """``("key=old, ...", "key=new, ...")`` over the keys whose values differ; None if none."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return None
    return (
        ", ".join(f"{k}={old.get(k)}" for k in keys),
        ", ".join(f"{k}={new.get(k)}" for k in keys),
    )


@dataclass
class Checkpoint:
    """One checkpoint: its file and its state (the owners' state dicts side by side,
    the step, the process count, the config and the overrides it was trained with)."""

    path: Path
    state: dict[str, Any]

    # --- where it is ----------------------------------------------------------------

    @staticmethod
    def locate(
        run: str | Path, named: str, accepts: str = "a run directory or its last.pt"
    ) -> Path:
        """A checkpoint file, or a run directory's last.pt; a missing one is a UserError
        that says who ``named`` it and what it ``accepts``."""
        path = Path(run)
        if path.is_dir():
            path = path / CHECKPOINT
        if not path.is_file():
            raise UserError(f"{named}: {path} does not exist (pass {accepts})")
        return path

    @staticmethod
    def path_of(resume: str) -> Path:
        """The checkpoint file a ``resume=PATH`` names."""
        return Checkpoint.locate(
            resume, f"resume={resume!r}", "a last.pt, its run directory, or auto"
        )

    @staticmethod
    def resolve(resume: str | None, run_dir: Path) -> Path | None:
        """``resume=``'s checkpoint: None for a new run; ``auto``: this run directory's
        last.pt if there is one; a directory: its last.pt."""
        if resume in NO_RESUME:
            return None
        if resume == AUTO:
            path = run_dir / CHECKPOINT
            return path if path.exists() else None
        return Checkpoint.path_of(str(resume))

    @staticmethod
    def run_dir_of(resume: str | None, default: str) -> str:
        """A run resumed from a checkpoint continues in that checkpoint's directory."""
        if resume in NO_RESUME or resume == AUTO:
            return default
        path = Path(str(resume))
        if path.is_dir():
            return str(path)
        if path.is_file():
            return str(path.parent)
        return default  # a missing path is reported by the trainer, with its name

    # --- writing ----------------------------------------------------------------------

    @classmethod
    def of_run(
        cls,
        path: Path,
        owners: dict[str, Any],
        *,
        step: int,
        world: int,
        ranks: list[dict[str, Any]] | None,
        config: dict[str, Any],
        overrides: list[str],
        made_on: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """A run's checkpoint: its owners' state dicts (``ranks``: each rank's own, in a
        data-parallel run) with what a resume checks them against (``config``: the run's
        config as nested dicts, ``config.config_tree``) and where it was made
        (``made_on``: device type and count, precision, versions)."""
        fp = fingerprint(flatten(config))
        state = {
            **owners,
            "schema": SCHEMA,
            "made_on": made_on or {},
            "step": step,
            "world": world,
            **({"ranks": ranks} if ranks is not None else {}),
            "fingerprint": fp,
            "fingerprint_hash": fingerprint_hash(fp),
            "config": config,
            "overrides": overrides,
        }
        return cls(path, state)

    def save(self) -> None:
        """Write to a temporary file in the same directory, fsync, then rename over the path.

        The rename is atomic, so the path always holds either the previous complete
        checkpoint or the new one, whenever the process dies (SIGKILL, power loss).
        """
        path = self.path
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(self.state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    # --- reading ----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: Path,
        map_location: str | torch.device = "cpu",
        mmap: bool = False,
        trust: bool = False,
    ) -> Checkpoint:
        """Load a checkpoint; a missing, truncated, foreign or unsafe file is a UserError
        naming it.

        Loaded with ``weights_only=True``: tensors and plain containers, nothing a file
        could make run. A file that needs more (a pickle of Python objects: the format
        before ``SCHEMA`` 2, or a planted object) is refused unless ``trust`` (the
        ``trust_checkpoint=true`` setting); its next save writes the safe format.
        ``mmap=True`` maps the tensors instead of reading them: cheap when only the
        small entries (config, step, overrides) are needed.
        """
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            if "GLOBAL " not in str(e):  # no object named: a damaged file, not an unsafe one
                raise _corrupt(path, e) from e
            state = _unsafe(path, map_location, trust, e)
        except Exception as e:  # a damaged file can fail in many ways
            raise _corrupt(path, e) from e
        if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
            raise UserError(f"checkpoint {path} is not a resnet-exp training checkpoint")
        schema = int(state.get("schema", 1))
        if schema > SCHEMA:
            raise UserError(
                f"checkpoint {path} is of format {schema}, written by a newer resnet-exp; this "
                f"one reads formats up to {SCHEMA}: upgrade resnet-exp to use it"
            )
        return cls(path, state)

    @property
    def schema(self) -> int:
        """The file's format: 1 (the older pickle) or ``SCHEMA``."""
        return int(self.state.get("schema", 1))

    @property
    def made_on(self) -> dict[str, Any]:
        """Where the run was when this was written (device type and count, precision,
        torch and resnet-exp versions); checkpoints of format 1 did not say."""
        return dict(self.state.get("made_on") or {})

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def world(self) -> int:
        return int(self.state.get("world", 1))

    @property
    def overrides(self) -> list[str]:
        """The command-line overrides the run was started with."""
        return list(self.state.get("overrides", []))

    @property
    def config(self) -> dict[str, Any] | None:
        """The saved config, as dotted keys; None if the checkpoint keeps none."""
        saved = self.state.get("config")
        return flatten(saved) if isinstance(saved, dict) and saved else None

    def run_config(self) -> Config:
        """The saved config, as the run's ``Config``."""
        saved = self.state.get("config")
        if not isinstance(saved, dict):
            raise UserError(
                f"{self.path} keeps no config (written by an older resnet-exp); cannot load it"
            )
        tree = OmegaConf.merge(OmegaConf.structured(Config), saved)
        return OmegaConf.to_object(tree)  # type: ignore[return-value]

    def load_weights(self, model: nn.Module, net: NetSpec) -> None:
        """Load the weights into ``model`` (the net ``net`` describes); weights of another
        net are a one-line UserError."""
        weights = self.state["model"]
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # torch lists every key over many lines
            raise UserError(
                f"{self.path} holds weights of another net than its config describes "
                f"(depth={net.depth}, block={net.block.value}, family={net.family.value}, "
                f"unit={net.unit.value}): {Mismatch.of(model.state_dict(), weights)}; was the "
                f"checkpoint replaced or written by another net?"
            ) from e

    # --- the one rule -----------------------------------------------------------------

    def check_config(
        self,
        flat: dict[str, Any],
        *,
        doing: str,
        asker: str,
        hint: str,
        allow: tuple[str, ...] = (),
    ) -> None:
        """Refuse ``flat`` (dotted keys) if it changes what this checkpoint's use depends on
        (see the module's doc); ``allow``: the matched keys this use lets differ.

        The one-line error reads "cannot {doing} {path}: it was trained with ..., {asker}
        asks for ...; {hint}". A checkpoint that
        keeps no config is held against its hash of the matched keys: nothing may differ.
        """
        saved = self.config
        if saved is None:
            if self.state.get("fingerprint_hash") != fingerprint_hash(fingerprint(flat)):
                raise UserError(
                    f"cannot {doing} {self.path}: it was trained with another model or data "
                    f"config (its config hash differs); {hint}"
                )
            return
        changed = differences(fingerprint(saved, allow), fingerprint(flat, allow))
        if changed:
            was, now = changed
            raise UserError(
                f"cannot {doing} {self.path}: it was trained with {was}, {asker} asks for {now}; "
                f"{hint}"
            )

    def changes(self, flat: dict[str, Any], ignore: tuple[str, ...]) -> list[str]:
        """The config's other differences from the saved one, ``key: old -> new``
        (none known without a saved config)."""
        saved = self.config
        if saved is None:
            return []
        return [
            f"{k}: {saved.get(k)} -> {flat.get(k)}"
            for k in sorted(set(saved) | set(flat))
            if not matches(k, ignore) and saved.get(k) != flat.get(k)
        ]


@dataclass(frozen=True)
class Mismatch:
    """How a state dict differs from a net's: the one account every loader of weights
    gives (torch lists every key over many lines)."""

    missing: list[str]  # the net's tensors the state lacks
    extra: list[str]  # the state's tensors the net has not
    shaped: list[str]  # in both, of another shape

    @classmethod
    def of(cls, ours: dict[str, Any], given: dict[str, Any]) -> Mismatch:
        return cls(
            [k for k in ours if k not in given],
            [k for k in given if k not in ours],
            [k for k in ours if k in given and ours[k].shape != given[k].shape],
        )

    @property
    def first(self) -> str:
        return (self.shaped or self.missing or self.extra or ["?"])[0]

    def __str__(self) -> str:
        return (
            f"{len(self.missing)} tensors missing, {len(self.extra)} unexpected, "
            f"{len(self.shaped)} of another shape (first: {self.first})"
        )


def _corrupt(path: Path, e: Exception) -> UserError:
    return UserError(
        f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); cannot use it"
    )


def _unsafe(
    path: Path, map_location: str | torch.device, trust: bool, e: Exception
) -> dict[str, Any]:
    """A checkpoint whose pickle names Python objects: loading it could run code."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    named = f" ({found.group(1)})" if found else ""
    if not trust:
        raise UserError(
            f"checkpoint {path} holds pickled Python objects{named} that loading would run; "
            f"it is not loaded. If it is a resnet-exp checkpoint of the older format from a "
            f"source you trust, pass trust_checkpoint=true"
        ) from None
    log.warning(
        "trust_checkpoint=true: loading %s as a pickle (older format)%s; its next save writes "
        "the safe format",
        path,
        named,
    )
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e2:
        raise _corrupt(path, e2) from e2
