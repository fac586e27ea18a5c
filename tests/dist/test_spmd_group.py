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
