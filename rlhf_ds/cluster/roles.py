"""Start the role groups of a run: Ray groups (one controller) or SPMD groups (deepspeed launcher).

``build_roles`` (and ``build_stage_roles``, the one trainable role of an SFT or reward-model stage) is
the one place that knows ``cluster.launcher``; everything after it sees
:class:`Roles`: one group (``cluster.group.Group``) per role in use, and ``is_main``, whether this
process writes logs and files. Roles that a config does not use (critic without GAE, reference without
KL, reward model without ``reward.use_model``) are not started at all.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

from rlhf_ds.cluster.group import Group
from rlhf_ds.cluster.placement import gpus_per_rank, plan_placement
from rlhf_ds.cluster.threads import worker_threads
from rlhf_ds.config import Config
from rlhf_ds.env import process_rank


def role_ranks(cfg: Config) -> dict[str, int]:
    """Ranks per role in use; the rollout engines count as the role ``rollout``."""
    return {"actor": cfg.actor.num_ranks,
            "critic": cfg.critic.num_ranks if cfg.needs_critic else 0,
            "reference": cfg.reference.num_ranks if cfg.needs_reference else 0,
            "reward": cfg.reward.num_ranks if cfg.uses_reward_model else 0,
            "rollout": cfg.rollout.num_engines}


def _worker_spec(cfg: Config, role: str) -> tuple[Callable, tuple]:
    """(class, constructor arguments) of one rank of ``role``."""
    # the engine and worker classes load torch and transformers: imported only when a role starts
    if role == "rollout":
        from rlhf_ds.rollout.engines import rollout_engine_spec
        return rollout_engine_spec(cfg)
    from rlhf_ds.workers.actor import ActorWorker
    from rlhf_ds.workers.critic import CriticWorker
    from rlhf_ds.workers.reference import ReferenceWorker
    from rlhf_ds.workers.reward_model import RewardModelWorker

    classes = {"actor": ActorWorker, "critic": CriticWorker, "reference": ReferenceWorker, "reward": RewardModelWorker}
    return classes[role], (cfg,)


def _main_runs(fn: Callable[[], Any]) -> Any:
    return fn()


def run_cleanup(steps: list[Callable[[], Any]]) -> None:
    """Run clean-up steps last-in first-out; every one runs even when an earlier one fails, and the first
    failure is raised after."""
    first: Optional[BaseException] = None
    while steps:
        try:
            steps.pop()()
        except Exception as err:  # noqa: BLE001 - keep cleaning, report the first
            first = first or err
    if first is not None:
        raise first


class Roles:
    """The groups of one run, by role name (a role not in use has none), and how its controllers agree.

    ``actor`` and ``rollout`` are there in every RL run (a stage's roles may lack them: asking raises);
    ``critic``, ``reference`` and ``reward`` are None when the config does not use them.
    is_main: writes logs and files (the Ray driver, or rank 0 under the launcher).
    any_process(flag): True on every controller when it is True on one (SPMD ranks must agree on when to
      stop; a single Ray driver agrees with itself).
    from_main(fn): fn() run by the main process alone, its result returned on every controller (SPMD ranks
      must train on identical rewards even when a reward function times out on one of them).
    """

    def __init__(self, groups: Mapping[str, Group], *, is_main: bool = True,
                 any_process: Callable[[bool], bool] = bool,
                 from_main: Callable[[Callable[[], Any]], Any] = _main_runs,
                 cleanup: Optional[list[Callable[[], Any]]] = None):
        self.groups = dict(groups)
        self.is_main, self.any_process, self.from_main = is_main, any_process, from_main
        self._cleanup = list(cleanup or [])

    def _require(self, role: str) -> Group:
        group = self.groups.get(role)
        if group is None:
            raise RuntimeError(f"role {role!r} was not started in this run (started: {', '.join(self.groups)})")
        return group

    @property
    def actor(self) -> Group:
        return self._require("actor")

    @property
    def rollout(self) -> Group:
        return self._require("rollout")

    @property
    def critic(self) -> Optional[Group]:
        return self.groups.get("critic")

    @property
    def reference(self) -> Optional[Group]:
        return self.groups.get("reference")

    @property
    def reward(self) -> Optional[Group]:
        return self.groups.get("reward")

    def trainable(self) -> dict[str, Group]:
        return {name: self.groups[name] for name in ("actor", "critic") if name in self.groups}

    def model_roles(self) -> dict[str, Group]:
        return {name: self.groups[name] for name in ("actor", "critic", "reference", "reward") if name in self.groups}

    def shutdown(self) -> None:
        """Every clean-up step runs, even when an earlier one fails; the first failure is raised after."""
        run_cleanup(self._cleanup)


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
    group is ``roles.groups[role]``. total_steps: optimizer steps of the stage, for its lr schedule."""
    ranks = {role: getattr(cfg, role).num_ranks, "rollout": cfg.rollout.num_engines if with_rollout else 0}

    def spec(cfg: Config, name: str) -> tuple[Callable, tuple]:
        return (worker_cls, (cfg,)) if name == role else _worker_spec(cfg, name)

    build = _build_ray if cfg.cluster.launcher == "ray" else _build_spmd
    roles = build(cfg, ranks, spec)
    try:
        roles.groups[role].run_all("init_model", total_steps)
    except BaseException:
        roles.shutdown()
        raise
    return roles


def _build_ray(cfg: Config, ranks: dict[str, int], spec: Callable = _worker_spec) -> Roles:
    import ray  # ray: only under the Ray launcher

    # ray: only under the Ray launcher
    from rlhf_ds.cluster.ray_group import RoleGroup, create_pools, remove_pools, start_ray, worker_env
    from rlhf_ds.engine.dist import has_gpu  # torch: loaded when first needed

    use_gpu = has_gpu() if not (cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS")) else None
    # the engines live in the actor's processes (Config.engines_in_actor), taking no resources of their own
    in_actor = bool(cfg.engines_in_actor and ranks.get("rollout") and ranks.get("actor"))
    ranks = dict(ranks, rollout=0) if in_actor else ranks
    plan = plan_placement(ranks, cfg.cluster.colocate, gpus_per_rank(cfg))
    started = start_ray(cfg.cluster.ray_address, plan.total_cpus(bool(use_gpu), cfg.cluster.cpus_per_worker))
    if use_gpu is None:   # joined a cluster: its resources decide, not the driver's host
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    cpus = cfg.cluster.cpus_per_worker
    groups: dict[str, RoleGroup] = {}
    cleanup: list[Callable[[], Any]] = [lambda: ray.shutdown() if started else None]
    try:
        pools = create_pools(plan, use_gpu=use_gpu, cpus_per_worker=cpus,
                             strategy=cfg.cluster.placement_strategy)
        cleanup.append(lambda: remove_pools(pools))
        threads = worker_threads(cfg, ranks, os.cpu_count() or 1)
        for name, n in ranks.items():
            if n == 0:
                continue
            cls, args = spec(cfg, name)
            groups[name] = RoleGroup(name, cls, plan, pools, use_gpu=use_gpu, cpus_per_worker=cpus, worker_args=args,
                                     env=dict(worker_env(), OMP_NUM_THREADS=str(threads[name])),
                                     call_timeout_s=cfg.cluster.call_timeout_s)
            cleanup.append(groups[name].shutdown)
        if in_actor:
            groups["rollout"] = groups["actor"].attach("rollout", *spec(cfg, "rollout"))
    except BaseException:
        run_cleanup(cleanup)
        raise
    return Roles(groups, is_main=True, cleanup=cleanup)


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
    # torch: loaded when first needed
    from rlhf_ds.cluster.spmd_group import SpmdGroup

    # torch: loaded when first needed
    from rlhf_ds.engine.dist import any_rank, dp_size, init_distributed, on_rank0_shared

    init_distributed(timeout_s=cfg.cluster.dist_timeout_s)
    check_spmd_ranks(ranks, dp_size())   # before any worker is built: every rank raises the same error
    groups: dict[str, Group] = {}
    for name, n in ranks.items():
        if n == 0:
            continue
        # SPMD: every rank owns one rollout engine, whatever rollout.num_engines says
        cls, args = spec(cfg, name)
        groups[name] = SpmdGroup(name, cls, worker_args=args)
    return Roles(groups, is_main=process_rank() == 0, any_process=any_rank, from_main=on_rank0_shared,
                 cleanup=[g.shutdown for g in groups.values()])
