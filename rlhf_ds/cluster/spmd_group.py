"""Role groups under the deepspeed launcher (SPMD): the group interface of ``cluster.group``.

Under ``deepspeed -m rlhf_ds.cli train ...`` every process runs the whole controller. Each process is
rank ``r`` of every role (the roles share the world group); a dispatched batch, identical on every rank,
is cut exactly as the Ray group cuts it, each rank works on shard ``r``, and the shard results are
all-gathered so every rank continues with the full result and takes the same controller decisions.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.distributed as dist

from rlhf_ds.cluster.dispatch import concat_results, split_by_rank
from rlhf_ds.cluster.group import Group
from rlhf_ds.rollout.weights import load_in_process


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(value: Any) -> list:
    rank, world = _world()
    if world == 1:
        return [value]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


class _Done:
    """An already computed result, shaped like the Ray group's ``Pending``."""

    def __init__(self, value: Any):
        self.value = value

    def get(self) -> Any:
        return self.value


class SpmdGroup:
    """This process's rank of one role; results are all-gathered so every rank sees them all."""

    def __init__(self, role: str, worker_cls: Callable, *, worker_args: Sequence = (),
                 worker_kwargs: dict | None = None):
        self.role = role
        self.rank, self.num_ranks = _world()
        self._worker = worker_cls(*worker_args, **dict(worker_kwargs or {}))

    def run_all(self, method: str, *args, **kwargs) -> list:
        return _all_gather(getattr(self._worker, method)(*args, **kwargs))

    def run_all_async(self, method: str, *args, **kwargs) -> _Done:
        return _Done(self.run_all(method, *args, **kwargs))

    def dispatch(self, method: str, batch: Any, *args, even: bool = True, concat: bool = True, **kwargs) -> Any:
        shard = split_by_rank(batch, self.num_ranks, even=even)[self.rank]
        gathered = _all_gather(getattr(self._worker, method)(shard, *args, **kwargs))
        return concat_results(gathered) if concat else gathered

    def dispatch_async(self, method: str, batch: Any, *args, even: bool = True, concat: bool = True,
                       **kwargs) -> _Done:
        return _Done(self.dispatch(method, batch, *args, even=even, concat=concat, **kwargs))

    def sync_weights(self, rollout: Group, bucket_mb: float, version: str) -> int:
        """Every rank gathers each bucket (collective) and loads it into its own engine, in memory."""
        if not isinstance(rollout, SpmdGroup):
            raise TypeError(f"an SPMD actor group syncs into this process's engine (an SpmdGroup), got "
                            f"{type(rollout).__name__}")
        return load_in_process(self._worker, rollout._worker, int(bucket_mb * 2 ** 20), version)

    def shutdown(self) -> None:
        self._worker = None
