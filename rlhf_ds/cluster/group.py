"""The group interface: all the trainer sees of a role, whichever launcher placed its ranks.

Two implementations, one per launcher:

- :class:`rlhf_ds.cluster.ray_group.RoleGroup`: one Ray actor per rank, driven by one controller;
- :class:`rlhf_ds.cluster.spmd_group.SpmdGroup`: this process's rank under the deepspeed launcher,
  where every rank runs the controller and results are all-gathered.

A group has two fan-out verbs (the same call on every rank, or a batch cut into rank shards), their
``*_async`` forms (so the controller can overlap roles), weight sync as a verb of the actor group toward
the rollout group, and ``shutdown``. Which process writes logs and files is a property of the run's
groups as a whole (:class:`rlhf_ds.cluster.roles.Roles.is_main`), not of the trainer.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


class Pending(Protocol):
    """The results of a fan-out call that may still be running."""

    def get(self) -> Any:
        """Wait for every rank; per-rank results, or their concatenation (``concat=True``)."""
        ...


@runtime_checkable
class Group(Protocol):
    role: str
    num_ranks: int

    def run_all(self, method: str, *args, **kwargs) -> list:
        """``worker.method(*args, **kwargs)`` on every rank; the list of rank results, rank order."""
        ...

    def run_all_async(self, method: str, *args, **kwargs) -> Pending:
        ...

    def dispatch(self, method: str, batch: Any, *args, even: bool = True, concat: bool = True,
                 **kwargs) -> Any:
        """Cut ``batch`` into contiguous rank shards (``cluster.dispatch``), call ``method(shard, *args)``
        on each rank, concatenate the results in rank order (``concat=False``: the list of them).
        ``even=False`` allows shards that differ by one row (work without collectives)."""
        ...

    def dispatch_async(self, method: str, batch: Any, *args, even: bool = True, concat: bool = True,
                       **kwargs) -> Pending:
        ...

    def sync_weights(self, rollout: "Group", bucket_mb: float, version: str) -> int:
        """Actor groups: gather this role's full parameters bucket by bucket (every rank takes part in
        the gathers) and load them into every engine of the ``rollout`` group as weight ``version``, by
        the protocol of ``rollout.weights`` (checked first, live at once). Returns the tensors sent."""
        ...

    def shutdown(self) -> None:
        ...
