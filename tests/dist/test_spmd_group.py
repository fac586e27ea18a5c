"""SpmdGroup (deepspeed launcher) on 2 gloo processes: each rank works on its shard and
every rank gets the whole result back, cut exactly as the Ray group cuts it."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_ds.batch import Experience
from rlhf_ds.cluster.spmd_group import SpmdGroup

pytestmark = pytest.mark.dist


class ShardWorker:
    def tag_rows(self, exp: Experience) -> torch.Tensor:
        return exp.rewards + 100 * dist.get_rank()

    def rank(self) -> int:
        return dist.get_rank()


def _run(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = SpmdGroup("actor", ShardWorker)
    exp = Experience(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1),
                     response_ids=torch.zeros(4, 1, dtype=torch.long), response_mask=torch.ones(4, 1),
                     group_ids=torch.arange(4), rewards=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    results[rank] = (group.dispatch("tag_rows", exp).tolist(), group.run_all("rank"),
                     group.dispatch("tag_rows", exp, concat=False)[1].tolist())
    dist.destroy_process_group()


def test_dispatch_gathers_rank_ordered_shards_on_every_rank():
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_run, args=(port, results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank] == ([1.0, 2.0, 103.0, 104.0], [0, 1], [103.0, 104.0])


def _shared_rewards(rank: int, port: int, results) -> None:
    from rlhf_ds.engine.dist import SharedCallError, on_rank0_shared

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    calls = []

    def reward():   # differs per rank, as a reward function that timed out on one rank would
        calls.append(rank)
        return [float(rank), 1.0]

    def broken():
        raise TimeoutError("reward function ran past 5 s")

    shared = on_rank0_shared(reward)
    try:
        on_rank0_shared(broken)
        error = None
    except (SharedCallError, TimeoutError) as err:
        error = f"{type(err).__name__}: {err}"
    results[rank] = (shared, calls, error)
    dist.destroy_process_group()


def test_rewards_are_computed_by_rank_0_and_shared_with_its_errors():
    """Under the deepspeed launcher every rank trains on rank 0's rewards, and a reward call that fails
    on rank 0 fails on every rank instead of leaving the others waiting at the broadcast."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_shared_rewards, args=(port, results), nprocs=2, join=True)
    assert results[0][:2] == ([0.0, 1.0], [0]) and results[1][:2] == ([0.0, 1.0], [])
    assert results[0][2] == "TimeoutError: reward function ran past 5 s"
    assert results[1][2] == ("SharedCallError: rank 0 failed in a call whose result every rank shares: "
                             "TimeoutError: reward function ran past 5 s")
