"""How many torch threads each worker process runs: threads follow the work (pure planning).

The trainer runs its stages one after another (rollout, reference / critic / old-log-prob passes,
training, sync); inside a stage the busy workers run concurrently. A worker that gets one thread while it
is the only one working leaves the other cores idle (docs/design.md#threads-on-a-2-core-host: a small-model GRPO step took ~1.9 s
with one thread per worker, ~1.6 s with two on 2 cores), and workers that all take every core while
they run together oversubscribe (4 busy threads on 2 cores: 10x slower). So each role gets the host's
cores divided by the most workers busy at once in any stage it takes part in.
"""
from __future__ import annotations

from typing import Any


def stage_roles(cfg: Any) -> dict[str, tuple[str, ...]]:
    """The roles that work concurrently in each stage of an RL step."""
    passes = ("reference", "critic") + (() if cfg.on_policy_update else ("actor",))
    # asynchronous generation: the engines work through every stage of the step before
    overlap = ("rollout",) if cfg.rollout.async_generation else ()
    # engines inside the actor's processes: those generate, with the actor's threads
    engines = ("actor",) if cfg.engines_in_actor else ("rollout",)
    return {"rollout": engines, "scores": ("reward",) + overlap, "passes": passes + overlap,
            "train": ("actor", "critic") + overlap}


def worker_threads(cfg: Any, role_ranks: dict[str, int], cores: int) -> dict[str, int]:
    """Threads of each rank of each role in use with processes of its own: ``cluster.threads_per_worker``
    when set, else ``cores`` over the most ranks busy together in the stages the role works in (at least
    1). Engines inside the actor's processes (``Config.engines_in_actor``) run on the actor's threads."""
    if cfg.engines_in_actor:   # the engines run in the actor's processes, on its threads
        role_ranks = dict(role_ranks, rollout=0)
    if cfg.cluster.threads_per_worker > 0:
        return {role: cfg.cluster.threads_per_worker for role, n in role_ranks.items() if n}
    busy = {stage: sum(role_ranks.get(role, 0) for role in roles) for stage, roles in stage_roles(cfg).items()}
    out = {}
    for role, n in role_ranks.items():
        if n:
            most = max((busy[stage] for stage, roles in stage_roles(cfg).items() if role in roles), default=n)
            out[role] = max(1, cores // max(most, 1))
    return out
