"""RoleGroup under a real local Ray: each role its own torch.distributed group, fan-out verbs, failures."""
import os
import sys

import pytest
import torch

ray = pytest.importorskip("ray")

from rlhf_ds.batch import Experience  # noqa: E402
from rlhf_ds.cluster.placement import plan_placement  # noqa: E402
from rlhf_ds.cluster.ray_group import RoleGroup, WorkerFailure, create_pools, remove_pools, worker_env  # noqa: E402

pytestmark = pytest.mark.e2e


class RankWorker:
    """A trivial worker: joins its role's gloo group from the environment the group sets."""

    def __init__(self, tag: str):
        import torch.distributed as dist
        self.tag = tag
        dist.init_process_group("gloo")   # env:// rendezvous published by rank 0
        self.dist = dist

    def info(self):
        return self.tag, self.dist.get_rank(), self.dist.get_world_size()

    def sum_over_ranks(self, value: float) -> float:
        t = torch.tensor([value])
        self.dist.all_reduce(t)
        return t.item()

    def scaled_rewards(self, exp: Experience, factor: float) -> torch.Tensor:
        return exp.rewards * factor + self.dist.get_rank() * 1000

    def fail_on(self, rank: int):
        if self.dist.get_rank() == rank:
            raise ValueError(f"boom from rank {rank}")
        self.dist.barrier()   # the healthy rank blocks in a collective with the failed one

    def die_on(self, rank: int):
        if self.dist.get_rank() == rank:
            os._exit(3)
        self.dist.barrier()


# A simulated GPU cluster: Ray schedules logical GPUs on a host without any, and gives each actor the
# CUDA_VISIBLE_DEVICES of the GPUs it was granted, as it would on a real node.
SIMULATED_GPUS = 4


@pytest.fixture(scope="module")
def pools():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests/
    plan = plan_placement({"actor": 2, "critic": 2}, colocate=False)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, num_gpus=SIMULATED_GPUS, include_dashboard=False,
                 runtime_env={"env_vars": worker_env()})
    made = create_pools(plan, use_gpu=False, cpus_per_worker=0.25)
    yield plan, made
    remove_pools(made)
    if started:
        ray.shutdown()


def _group(role, plan, made):
    return RoleGroup(role, RankWorker, plan, made, use_gpu=False, cpus_per_worker=0.25, worker_args=(role,))


def test_each_role_forms_its_own_group_and_dispatch_keeps_rank_order(pools):
    plan, made = pools
    actor, critic = _group("actor", plan, made), _group("critic", plan, made)
    try:
        assert actor.run_all("info") == [("actor", 0, 2), ("actor", 1, 2)]
        assert critic.run_all("sum_over_ranks", 1.5) == [3.0, 3.0]
        exp = Experience(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1),
                         response_ids=torch.zeros(4, 1, dtype=torch.long), response_mask=torch.ones(4, 1),
                         group_ids=torch.arange(4), rewards=torch.tensor([1.0, 2.0, 3.0, 4.0]))
        # rows 0-1 go to rank 0, rows 2-3 to rank 1 (which adds 1000), and come back in order
        assert actor.dispatch("scaled_rewards", exp, 10.0).tolist() == [10.0, 20.0, 1030.0, 1040.0]
        with pytest.raises(WorkerFailure, match=r"(?s)role 'actor' rank 1 failed: .*ValueError: boom from rank 1"):
            actor.run_all("fail_on", 1)
        with pytest.raises(WorkerFailure, match=r"(?s)role 'critic' rank 0 failed: .*died"):
            critic.run_all("die_on", 0)
    finally:
        actor.shutdown()
        critic.shutdown()


class Guest:
    """A second worker living in a rank's process (RoleGroup.attach)."""

    def __init__(self, tag: str):
        self.tag, self.pid = tag, os.getpid()

    def where(self):
        return self.tag, self.pid

    def fail(self):
        raise RuntimeError("guest failed")


def test_an_attached_role_lives_in_the_hosts_processes_and_failures_name_both(pools):
    plan, made = pools
    actor = _group("actor", plan, made)
    try:
        guest = actor.attach("rollout", Guest, ("guest",))
        host_pids = actor.apply_all(lambda _worker, _rank: os.getpid())
        assert guest.run_all("where") == [("guest", pid) for pid in host_pids]
        assert actor.run_all("info") == [("actor", 0, 2), ("actor", 1, 2)]   # the host's worker is untouched
        with pytest.raises(WorkerFailure, match=r"(?s)role 'rollout' rank [01] \(in the processes of role 'actor'\) "
                                                r"failed: .*guest failed"):
            guest.run_all("fail")
        guest.shutdown()   # the host's processes stay: they are the host group's to end
        assert actor.run_all("info") == [("actor", 0, 2), ("actor", 1, 2)]
    finally:
        actor.shutdown()


class GpuProbe:
    """Reports the GPUs Ray granted the rank's process."""

    def __init__(self, tag: str):
        self.tag = tag

    def gpus(self):
        return self.tag, sorted(str(g) for g in ray.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES")


def _gpu_groups(plan, made, *roles):
    return [RoleGroup(role, GpuProbe, plan, made, use_gpu=True, cpus_per_worker=0.25, worker_args=(role,))
            for role in roles]


def test_tensor_parallel_engines_hold_their_gpus_on_a_simulated_gpu_cluster(pools):
    """Each engine's Ray actor is granted tensor_parallel_size GPUs of one bundle (vLLM's workers then see
    exactly those); no GPU is granted twice."""
    plan = plan_placement({"actor": 2, "rollout": 1}, colocate=False, rank_gpus={"rollout": 2})
    assert plan.total_gpus() == SIMULATED_GPUS
    made = create_pools(plan, use_gpu=True, cpus_per_worker=0.25)
    groups = _gpu_groups(plan, made, "actor", "rollout")
    try:
        (actor, rollout) = [g.run_all("gpus") for g in groups]
        assert [len(ids) for _, ids, _ in actor] == [1, 1]
        (_, engine_gpus, visible), = rollout
        assert len(engine_gpus) == 2 and sorted(visible.split(",")) == engine_gpus
        granted = [g for _, ids, _ in actor + rollout for g in ids]
        assert len(set(granted)) == SIMULATED_GPUS
    finally:
        for g in groups:
            g.shutdown()
        remove_pools(made)


def test_colocated_ranks_share_the_gpu_of_their_bundle_on_a_simulated_gpu_cluster(pools):
    """Rank i of the actor, the reference and the engines land on the same GPU; ranks differ by GPU."""
    plan = plan_placement({"actor": 2, "reference": 2, "rollout": 2}, colocate=True)
    made = create_pools(plan, use_gpu=True, cpus_per_worker=0.25)
    groups = _gpu_groups(plan, made, "actor", "reference", "rollout")
    try:
        by_role = [g.run_all("gpus") for g in groups]
        per_rank = [{ids[0] for _, ids, _ in (role[rank] for role in by_role)} for rank in range(2)]
        assert all(len(gpus) == 1 for gpus in per_rank) and per_rank[0] != per_rank[1]
    finally:
        for g in groups:
            g.shutdown()
        remove_pools(made)
