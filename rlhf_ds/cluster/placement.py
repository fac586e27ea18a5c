"""Which bundle of which placement group each rank of each role lands on (pure planning, no Ray).

A *pool* is one placement group. Every role gets its own pool, except the colocated roles (actor,
reference, rollout when ``cluster.colocate``), which share one pool: rank ``i`` of each of them lands
on bundle ``i mod size`` and asks for ``1 / members`` of it, so the three fit on the same GPU (or CPU
slice) the way the colocated recipes of OpenRLHF and verl share devices.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def bundle(self, use_gpu: bool, cpus_per_worker: float) -> dict[str, float]:
        """Resources of one bundle: a whole GPU (plus a CPU) on GPU machines, a CPU slice on CPU."""
        return {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": cpus_per_worker}

    def rank_resources(self, role: str, use_gpu: bool, cpus_per_worker: float) -> dict[str, float]:
        """What one rank of ``role`` requests from its bundle (num_cpus / num_gpus of the Ray actor)."""
        share = self.roles[role].share
        if use_gpu:
            return {"num_gpus": share, "num_cpus": share}
        return {"num_gpus": 0.0, "num_cpus": cpus_per_worker * share}

    def total_cpus(self, use_gpu: bool, cpus_per_worker: float) -> float:
        return sum(size * self.bundle(use_gpu, cpus_per_worker)["CPU"] for size in self.pool_sizes.values())


def plan_placement(role_ranks: dict[str, int], colocate: bool) -> PlacementPlan:
    """Plan pools for ``role_ranks`` (role name -> ranks; roles with 0 ranks are left out)."""
    role_ranks = {role: n for role, n in role_ranks.items() if n > 0}
    shared = [role for role in COLOCATED_ROLES if role in role_ranks] if colocate else []
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
    return PlacementPlan(pool_sizes, roles)
