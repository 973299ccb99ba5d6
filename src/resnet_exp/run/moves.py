"""A run continued somewhere else: on another device type, number of processes,
precision or version of torch than the checkpoint was made on.

What is kept exactly wherever the run goes: the weights, the optimizer's and the
schedule's state, the step, and the data order (the permutation of each epoch comes
from a CPU generator, and a run's global batch at a step is the same block of that
permutation on any number of processes). What cannot be carried over is re-derived,
deterministically: the augmentation generator of a device of another type (a CUDA
generator's state is no CPU generator's) or of a rank the checkpoint did not have.

So a run continued on the same device type and number of processes is bit-identical
to one that never stopped (on a CPU with ``trainer.deterministic=true``); any other
move continues the same run statistically (the same data order and recipe, other
random crops and flips from the move on). ``describe`` says which, once, at the resume.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from resnet_exp.data.batch_aug import STATE_KEY as BATCH_AUG_GEN


@dataclass(frozen=True)
class Place:
    """Where a run trains: device type, processes, precision, torch version."""

    device: str  # cpu | cuda
    processes: int
    precision: str
    torch: str = str(torch.__version__)  # (a TorchVersion is no plain str: weights_only refuses it)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "processes": self.processes,
            "precision": self.precision,
            "torch": self.torch,
        }

    @classmethod
    def of(cls, made_on: dict[str, Any], world: int) -> Place | None:
        """Where a checkpoint says it was made (None: a checkpoint of the older format)."""
        if not made_on:
            return None
        return cls(
            str(made_on.get("device", "?")),
            int(made_on.get("processes", world)),
            str(made_on.get("precision", "?")),
            str(made_on.get("torch", "?")),
        )


def describe(then: Place | None, now: Place, world_then: int) -> tuple[bool, str | None]:
    """(bit-exact?, the line to log) for a run made at ``then`` continued at ``now``."""
    if then is None:  # the older format did not record its device; its process count it did
        if world_then == now.processes:
            return True, None
        then = Place("?", world_then, "?", "?")
    changes = []
    if then.device != now.device:
        changes.append(f"device {then.device} -> {now.device}")
    if then.processes != now.processes:
        changes.append(f"processes {then.processes} -> {now.processes}")
    exact = not changes
    if then.precision != now.precision:
        changes.append(f"precision {then.precision} -> {now.precision}")
    if then.torch != now.torch:
        changes.append(f"torch {then.torch} -> {now.torch}")
    if not changes:
        return True, None
    how = (
        "it continues bit for bit"
        if exact
        else "it continues the same run statistically: the same data order and recipe, "
        "its random crops and flips drawn from a re-derived generator from here on"
    )
    return exact, f"continuing a run made elsewhere ({', '.join(changes)}): {how}"


def regroup(ranks: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Per-rank states (loader, RNG, running metrics) of a run of ``len(ranks)`` processes,
    for ``world`` processes: the data order kept (each epoch's permutation rebuilt from
    the ranks' shares and split again), the running sums gathered on rank 0, rank 0's
    RNG states for every rank, the augmentation generators re-derived."""
    if len(ranks) == world:
        return ranks
    loaders = _loaders([r["loader"] for r in ranks], world)
    metrics = _metrics([r["metrics"] for r in ranks if "metrics" in r], world)
    out = []
    for rank in range(world):
        state = {"loader": loaders[rank], "rng": copy.deepcopy(ranks[0]["rng"])}
        if metrics:
            state["metrics"] = metrics[rank]
        out.append(state)
    return out


RANK_DRAWS = ("aug_gen", BATCH_AUG_GEN)  # a loader's per-rank generator states


def _loaders(saved: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    # Each rank's augmentation draws (None: each loader re-derives its generator from the
    # seed, its rank and the position; rank 0's copied to every rank would draw alike).
    first = {**saved[0], **{k: None for k in RANK_DRAWS if k in saved[0]}}
    if "perm" not in first:  # streamed data: a position in a seeded order, the same on every rank
        skipped = [s for state in saved for s in state.get("skipped", [])]
        return [{**first, "skipped": skipped if r == 0 else []} for r in range(world)]
    n = sum(len(s["perm"]) for s in saved)
    full = torch.empty(n, dtype=first["perm"].dtype)
    for r, state in enumerate(saved):
        full[r :: len(saved)] = state["perm"]
    return [{**first, "perm": full[r::world].clone(), "aug_gen": None} for r in range(world)]


def _metrics(saved: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    if not saved:
        return []
    gathered = copy.deepcopy(saved[0])
    for window in ("interval", "epoch"):
        w = gathered[window]
        w["loss_sum"] = sum(s[window]["loss_sum"] for s in saved)
        w["wrong_sum"] = sum(s[window]["wrong_sum"] for s in saved)
        w["seen"] = sum(s[window]["seen"] for s in saved)
    empty = copy.deepcopy(gathered)
    for window in ("interval", "epoch"):
        w = empty[window]
        w["loss_sum"], w["wrong_sum"], w["seen"] = torch.zeros(()), torch.zeros(()), 0
    return [gathered if r == 0 else copy.deepcopy(empty) for r in range(world)]


def for_device(optimizer_state: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's saved state with the implementation flags of this run's optimizer
    (``defaults``: ``fused`` on a GPU, ``foreach`` on a CPU, as build_optimizer chose), so
    a CPU checkpoint continued on a GPU steps with the fused kernel its CUDA graph captures."""
    flags = {k: defaults.get(k) for k in ("fused", "foreach")}
    groups = [{**g, **flags} for g in optimizer_state["param_groups"]]
    return {**optimizer_state, "param_groups": groups}
