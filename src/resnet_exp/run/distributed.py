"""Data-parallel runs: process-group setup under torchrun or a multi-task SLURM job.

One run, several processes: every rank holds the whole (small) data set on
its device and takes every ``world``-th index of the shared permutation; DDP
all-reduces the gradients. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import os
import time
import uuid
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


ONE_PROCESS = DistInfo()  # a run that is not data-parallel


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
        store, rank, world = store
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    _share_launch_time()
    return current()


def _store_of_this_start() -> tuple[dist.Store, int, int] | None:
    """Under torchrun, the agent's store with keys of this start of the workers alone
    (and this rank, the world); None elsewhere (``init_process_group`` reads the
    environment itself).

    torchrun's agent hosts one store for all starts of the workers (``--max-restarts``)
    and torch hands it to them without a per-start prefix: after a restart, a new rank
    reads a dead worker's gloo address left by the start before and fails ("Connection
    refused"). Nothing the agent exports tells the starts apart on every node (the
    restart count is per agent: one that restarts for a rejoining node does not count
    it), so the ranks agree on a start number in the store (``_agree_on_start``).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=default_pg_timeout,
    )
    start = _agree_on_start(dist.PrefixStore("resnet_exp", store), rank, world)
    return dist.PrefixStore(f"resnet_exp/start_{start}", store), rank, world


def _agree_on_start(store: dist.Store, rank: int, world: int) -> int:
    """A number that every rank of this start gets and no earlier start had.

    Rank 0 takes the next number; every other rank asks for it under a token of its
    own and acknowledges the answer with it. An ask left by a worker of an earlier
    start is answered at most once and never acknowledged with this number: rank 0
    waits until every rank's ask is, so none is left behind.
    """
    if rank != 0:
        token = uuid.uuid4().hex
        store.set(f"ask/{rank}", token)
        start = int(store.get(f"answer/{token}"))  # blocks until rank 0 answers
        store.set(f"ack/{token}", str(start))
        return start
    start = store.add("starts", 1)
    waiting, deadline = set(range(1, world)), time.monotonic() + default_pg_timeout.total_seconds()
    while waiting:
        for r in sorted(waiting):
            if not store.check([f"ask/{r}"]):
                continue
            token = store.get(f"ask/{r}").decode()
            if store.check([f"ack/{token}"]) and int(store.get(f"ack/{token}")) == start:
                waiting.discard(r)
            elif not store.check([f"answer/{token}"]):
                store.set(f"answer/{token}", str(start))
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"ranks {sorted(waiting)} did not join this start in time")
        if waiting:
            time.sleep(0.01)
    return start


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
