"""Which bundle of which placement group each rank of each role lands on (pure planning, no Ray).

A *pool* is one placement group. Every role gets its own pool, except the colocated roles (actor,
reference, rollout when ``cluster.colocate``), which share one pool: rank ``i`` of each of them lands
on bundle ``i mod size`` and asks for ``1 / members`` of it, so the three fit on the same GPU (or CPU
slice) the way the colocated recipes of OpenRLHF and verl share devices.

On GPUs a bundle is one GPU, except for a role whose ranks each need several: a vLLM engine with
``tensor_parallel_size`` t gets bundles of t GPUs, all on one node, and its Ray actor holds them (vLLM's
tensor-parallel workers then see exactly those GPUs). Such a role is never colocated (config rules).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

COLOCATED_ROLES = ("actor", "reference", "rollout")


@dataclass(frozen=True)
class RolePlacement:
    pool: str                     # placement-group name
    bundle_indices: tuple[int, ...]  # bundle of each rank
    share: float                  # fraction of a bundle each rank asks for


@dataclass(frozen=True)
class PlacementPlan:
    pool_sizes: dict[str, int]    # bundles per placement group
    roles: dict[str, RolePlacement]
    pool_gpus: dict[str, int] = field(default_factory=dict)   # GPUs per bundle where not 1

    def bundle(self, use_gpu: bool, cpus_per_worker: float, pool: str = "") -> dict[str, float]:
        """Resources of one bundle of ``pool``: its GPUs (plus a CPU) on GPU machines, a CPU slice on CPU."""
        if use_gpu:
            return {"GPU": float(self.pool_gpus.get(pool, 1)), "CPU": 1.0}
        return {"CPU": cpus_per_worker}

    def rank_resources(self, role: str, use_gpu: bool, cpus_per_worker: float) -> dict[str, float]:
        """What one rank of ``role`` requests from its bundle (num_cpus / num_gpus of the Ray actor)."""
        placement = self.roles[role]
        if use_gpu:
            return {"num_gpus": self.pool_gpus.get(placement.pool, 1) * placement.share, "num_cpus": placement.share}
        return {"num_gpus": 0.0, "num_cpus": cpus_per_worker * placement.share}

    def total_cpus(self, use_gpu: bool, cpus_per_worker: float) -> float:
        return sum(size * self.bundle(use_gpu, cpus_per_worker, pool)["CPU"] for pool, size in self.pool_sizes.items())

    def total_gpus(self) -> int:
        return sum(size * self.pool_gpus.get(pool, 1) for pool, size in self.pool_sizes.items())


def gpus_per_rank(cfg: Any) -> dict[str, int]:
    """GPUs each rank of a role holds where not one (a run's ``Config``): a vLLM engine's tensor-parallel
    GPUs."""
    return {"rollout": cfg.rollout.vllm.tensor_parallel_size} if cfg.rollout.backend == "vllm" else {}


def plan_placement(role_ranks: dict[str, int], colocate: bool, rank_gpus: Optional[dict[str, int]] = None
                   ) -> PlacementPlan:
    """Plan pools for ``role_ranks`` (role name -> ranks; roles with 0 ranks are left out).
    rank_gpus: role -> GPUs each of its ranks holds where not 1 (``gpus_per_rank``)."""
    role_ranks = {role: n for role, n in role_ranks.items() if n > 0}
    rank_gpus = {role: g for role, g in (rank_gpus or {}).items() if role in role_ranks and g != 1}
    shared = [role for role in COLOCATED_ROLES if role in role_ranks] if colocate else []
    if len(shared) > 1 and any(role in rank_gpus for role in shared):
        raise ValueError(f"colocated roles share one GPU per bundle; {sorted(set(shared) & set(rank_gpus))} "
                         f"need several per rank")
    pool_sizes, roles = {}, {}
    if len(shared) > 1:
        size = max(role_ranks[role] for role in shared)
        pool_sizes["colocated"] = size
        for role in shared:
            roles[role] = RolePlacement("colocated", tuple(i % size for i in range(role_ranks[role])),
                                        1.0 / len(shared))
    for role, n in role_ranks.items():
        if role not in roles:
            pool_sizes[role] = n
            roles[role] = RolePlacement(role, tuple(range(n)), 1.0)
    pool_gpus = {role: g for role, g in rank_gpus.items() if roles[role].pool == role}
    return PlacementPlan(pool_sizes, roles, pool_gpus)
