"""Data-parallel runs: process-group setup under torchrun or a multi-task SLURM job.

One run, several processes: every rank holds the whole (small) data set on
its device and takes every ``world``-th index of the shared permutation; DDP
all-reduces the gradients. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

# Set on every rank to rank 0's start time, so each rank's Hydra computes
# the same run directory (Hydra's ${now:} would differ between processes).
LAUNCH_TIME_ENV = "RESNET_EXP_LAUNCH_TIME"
_PROCESS_START = time.time()


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _submitit_tasks() -> int:
    """Tasks of the submitit job this process belongs to (1 outside submitit)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 1
    return int(os.environ.get("SUBMITIT_LOCAL_NTASKS") or os.environ.get("SLURM_NTASKS") or 1)


def init_distributed() -> DistInfo:
    """Join the process group if this process is one of several; idempotent.

    torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; a multi-task submitit job gets
    them from submitit's helper. Backend: NCCL for CUDA tensors, gloo for CPU.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and _submitit_tasks() > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    store = _store_of_this_start()
    if store is None:
        dist.init_process_group(backend=backend)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    _share_launch_time()
    return current()


def _store_of_this_start() -> dist.Store | None:
    """Under torchrun, the agent's store, with keys of this start of the workers alone;
    None elsewhere (``init_process_group`` reads MASTER_ADDR/PORT itself).

    torchrun's agent hosts one store for all its starts (``--max-restarts``) and torch
    hands it to the workers without a per-start prefix: after a restart, a new rank
    would read a dead worker's gloo address left by the start before and fail
    ("Connection refused"). The restart count (the same on every agent whose workers
    failed, so on every node when a worker dies: its peers' collectives fail) keeps
    each start's keys apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=default_pg_timeout,
    )
    return dist.PrefixStore(f"resnet_exp/start_{restart}", store)


def current() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _share_launch_time() -> None:
    stamp = [os.environ.get(LAUNCH_TIME_ENV) or str(_PROCESS_START)]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[LAUNCH_TIME_ENV] = stamp[0]


def launch_time(pattern: str) -> str:
    """Format the run's start time: rank 0's under torchrun, else this process's."""
    stamp = float(os.environ.get(LAUNCH_TIME_ENV) or _PROCESS_START)
    return time.strftime(pattern, time.localtime(stamp))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def min_(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a host-side all-reduce over gloo)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_main(obj: object) -> list[object] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere); ``[obj]`` in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
