"""Process-group set-up under torchrun: each start of the workers keeps its own keys in
the agent's store (the restarts themselves: tests/test_scaling.py, slow)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch.distributed as dist

from resnet_exp.run.distributed import _agree_on_start


def test_the_ranks_of_a_restart_agree_on_a_new_start() -> None:
    """After a restart the store still holds the earlier start's asks, acknowledged: the new
    rank 0 must wait for the new rank 1 rather than take the old ask for it."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def store() -> dist.Store:  # each rank's own client, as each worker process has
        client = dist.TCPStore(
            "127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=20)
        )
        return dist.PrefixStore("resnet_exp", client)

    with ThreadPoolExecutor(3) as pool:
        first = [pool.submit(_agree_on_start, store(), r, 3) for r in (1, 2, 0)]
        assert [f.result(timeout=30) for f in first] == [1, 1, 1]
        # The restart: rank 0 starts first, the other ranks a while later.
        zero = pool.submit(_agree_on_start, store(), 0, 3)
        time.sleep(0.5)
        assert not zero.done()  # waiting for this start's ranks 1 and 2
        later = [pool.submit(_agree_on_start, store(), r, 3) for r in (2, 1)]
        assert [f.result(timeout=30) for f in later] == [2, 2]
        assert zero.result(timeout=30) == 2
