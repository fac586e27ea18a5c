"""Start the role groups of a run: Ray groups (one controller) or SPMD groups (deepspeed launcher).

``build_roles`` (and ``build_stage_roles``, the one trainable role of an SFT or reward-model stage) is
the one place that knows ``cluster.launcher``; everything after it sees
:class:`Roles`: one group (``cluster.group.Group``) per role in use, and ``is_main``, whether this
process writes logs and files. Roles that a config does not use (critic without GAE, reference without
KL, reward model without ``reward.use_model``) are not started at all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rlhf_ds.cluster.env import process_rank
from rlhf_ds.cluster.group import Group
from rlhf_ds.config import Config


def role_ranks(cfg: Config) -> dict[str, int]:
    """Ranks per role in use; the rollout engines count as the role ``rollout``."""
    return {"actor": cfg.actor.num_ranks,
            "critic": cfg.critic.num_ranks if cfg.needs_critic else 0,
            "reference": cfg.reference.num_ranks if cfg.needs_reference else 0,
            "reward": cfg.reward.num_ranks if cfg.uses_reward_model else 0,
            "rollout": cfg.rollout.num_engines}


def _worker_spec(cfg: Config, role: str) -> tuple[Callable, tuple]:
    """(class, constructor arguments) of one rank of ``role``."""
    if role == "rollout":
        from rlhf_ds.rollout.engines import rollout_engine_spec
        return rollout_engine_spec(cfg)
    from rlhf_ds.workers.actor import ActorWorker
    from rlhf_ds.workers.critic import CriticWorker
    from rlhf_ds.workers.reference import ReferenceWorker
    from rlhf_ds.workers.reward import RewardWorker

    classes = {"actor": ActorWorker, "critic": CriticWorker, "reference": ReferenceWorker, "reward": RewardWorker}
    return classes[role], (cfg,)


@dataclass
class Roles:
    """The groups of one run (None for a role not in use)."""
    actor: Group
    rollout: Group
    critic: Optional[Group] = None
    reference: Optional[Group] = None
    reward: Optional[Group] = None
    is_main: bool = True          # writes logs and files: the Ray driver, or rank 0 under the launcher
    # any_process(flag): True on every controller when it is True on one (SPMD ranks must agree on
    # when to stop; a single Ray driver agrees with itself)
    any_process: Callable[[bool], bool] = bool
    # from_main(fn): fn() run by the main process alone, its result returned on every controller (SPMD
    # ranks must train on identical rewards even when a reward function times out on one of them)
    from_main: Callable[[Callable[[], Any]], Any] = lambda fn: fn()
    _cleanup: list = field(default_factory=list)

    def trainable(self) -> dict[str, Group]:
        return {name: g for name, g in (("actor", self.actor), ("critic", self.critic)) if g is not None}

    def model_roles(self) -> dict[str, Group]:
        return {name: g for name in ("actor", "critic", "reference", "reward")
                if (g := getattr(self, name)) is not None}

    def shutdown(self) -> None:
        """Every clean-up step runs, even when an earlier one fails; the first failure is raised after."""
        first: Optional[BaseException] = None
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except Exception as err:  # noqa: BLE001 - keep cleaning, report the first
                first = first or err
        if first is not None:
            raise first


def build_roles(cfg: Config, total_steps: int) -> Roles:
    """Start every role in use and build its model (engines of different roles build concurrently)."""
    build = _build_ray if cfg.cluster.launcher == "ray" else _build_spmd
    roles = build(cfg, role_ranks(cfg))
    try:
        pending = [group.run_all_async("init_model", total_steps) if name in ("actor", "critic")
                   else group.run_all_async("init_model") for name, group in roles.model_roles().items()]
        for p in pending:
            p.get()
    except BaseException:
        roles.shutdown()   # no orphaned workers, placement groups or Ray instance after a failed start
        raise
    return roles


def build_stage_roles(cfg: Config, role: str, worker_cls: type, total_steps: int, *, with_rollout: bool) -> Roles:
    """Start the one trainable role of a training stage (SFT, reward-model training) as ``worker_cls``
    workers, with the rollout engines when the stage evaluates by generating, and build its model.

    The same start-up as ``build_roles`` (Ray groups, or SPMD groups under the deepspeed launcher); the
    group is ``getattr(roles, role)``. total_steps: optimizer steps of the stage, for its lr schedule."""
    ranks = {role: getattr(cfg, role).num_ranks, "rollout": cfg.rollout.num_engines if with_rollout else 0}

    def spec(cfg: Config, name: str) -> tuple[Callable, tuple]:
        return (worker_cls, (cfg,)) if name == role else _worker_spec(cfg, name)

    build = _build_ray if cfg.cluster.launcher == "ray" else _build_spmd
    roles = build(cfg, ranks, spec)
    try:
        getattr(roles, role).run_all("init_model", total_steps)
    except BaseException:
        roles.shutdown()
        raise
    return roles


def _build_ray(cfg: Config, ranks: dict[str, int], spec: Callable = _worker_spec) -> Roles:
    import ray

    from rlhf_ds.cluster.placement import plan_placement
    from rlhf_ds.cluster.ray_group import RoleGroup, create_pools, remove_pools, start_ray, worker_env
    from rlhf_ds.cluster.threads import worker_threads
    from rlhf_ds.engine.dist import has_gpu

    use_gpu = has_gpu() if not (cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS")) else None
    # the engines live in the actor's processes (Config.engines_in_actor), taking no resources of their own
    in_actor = bool(cfg.engines_in_actor and ranks.get("rollout") and ranks.get("actor"))
    ranks = dict(ranks, rollout=0) if in_actor else ranks
    plan = plan_placement(ranks, cfg.cluster.colocate)
    started = start_ray(cfg.cluster.ray_address, plan.total_cpus(bool(use_gpu), cfg.cluster.cpus_per_worker))
    if use_gpu is None:   # joined a cluster: its resources decide, not the driver's host
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    cpus = cfg.cluster.cpus_per_worker
    roles = Roles(actor=None, rollout=None, is_main=True)
    roles._cleanup.append(lambda: ray.shutdown() if started else None)
    try:
        pools = create_pools(plan, use_gpu=use_gpu, cpus_per_worker=cpus,
                             strategy=cfg.cluster.placement_strategy)
        roles._cleanup.append(lambda: remove_pools(pools))
        threads = worker_threads(cfg, ranks, os.cpu_count() or 1)
        for name, n in ranks.items():
            if n == 0:
                continue
            cls, args = spec(cfg, name)
            group = RoleGroup(name, cls, plan, pools, use_gpu=use_gpu, cpus_per_worker=cpus, worker_args=args,
                              env=dict(worker_env(), OMP_NUM_THREADS=str(threads[name])),
                              call_timeout_s=cfg.cluster.call_timeout_s)
            roles._cleanup.append(group.shutdown)
            setattr(roles, name, group)
        if in_actor:
            roles.rollout = roles.actor.attach("rollout", *spec(cfg, "rollout"))
    except BaseException:
        roles.shutdown()
        raise
    return roles


def check_spmd_ranks(ranks: dict[str, int], world_size: int) -> None:
    """Under the deepspeed launcher every process is one rank of every role: each role in use must have
    ``world_size`` ranks. ranks: ``role_ranks(cfg)`` (the rollout engines follow the processes)."""
    wrong = {role: n for role, n in ranks.items() if n and role != "rollout" and n != world_size}
    if wrong:
        listed = ", ".join(f"{role}.num_ranks={n}" for role, n in wrong.items())
        raise ValueError(f"cluster.launcher='deepspeed': {listed}, but the launcher started {world_size} "
                         f"process(es) (world size) and every process is one rank of every role; set "
                         f"{', '.join(f'{role}.num_ranks={world_size}' for role in wrong)}, or launch "
                         f"{max(wrong.values())} processes (deepspeed --num_gpus, or the hostfile's slots)")


def _build_spmd(cfg: Config, ranks: dict[str, int], spec: Callable = _worker_spec) -> Roles:
    from rlhf_ds.cluster.spmd_group import SpmdGroup
    from rlhf_ds.engine.dist import any_rank, dp_size, init_distributed, on_rank0_shared

    init_distributed(timeout_s=cfg.cluster.dist_timeout_s)
    check_spmd_ranks(ranks, dp_size())   # before any worker is built: every rank raises the same error
    roles = Roles(actor=None, rollout=None, is_main=process_rank() == 0, any_process=any_rank,
                  from_main=on_rank0_shared)
    for name, n in ranks.items():
        if n == 0:
            continue
        # SPMD: every rank owns one rollout engine, whatever rollout.num_engines says
        cls, args = spec(cfg, name)
        group = SpmdGroup(name, cls, worker_args=args)
        roles._cleanup.append(group.shutdown)
        setattr(roles, name, group)
    return roles
