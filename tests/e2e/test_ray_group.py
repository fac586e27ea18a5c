"""RoleGroup under a real local Ray: each role its own torch.distributed group, fan-out verbs, failures."""
import os
import sys

import pytest
import torch

ray = pytest.importorskip("ray")

from rlhf_ds.batch import Experience  # noqa: E402
from rlhf_ds.cluster.placement import plan_placement  # noqa: E402
from rlhf_ds.cluster.ray_group import RoleGroup, WorkerFailure, create_pools, remove_pools, worker_env  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.gpu_path]


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


class ToyActor:
    """An actor's side of the weight sync (manifest, buckets) over the micro model with new weights; every
    rank holds the same (as ZeRO-3 ranks gather the same full parameters)."""

    def __init__(self, model: str):
        from transformers import AutoModelForCausalLM

        from rlhf_ds.models.tiny import resolve_model_path

        self.model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model))
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)

    def weight_manifest(self):
        from rlhf_ds.rollout.weights import manifest_of

        return manifest_of(self.model.named_parameters())

    def weight_buckets(self, bucket_bytes=None, on_device=False):
        from rlhf_ds.engine.gather import iter_full_param_buckets

        return iter_full_param_buckets(self.model, bucket_bytes=bucket_bytes)


def _weights(group) -> list[dict]:
    return group.apply_all(lambda worker, _rank: {n: p.detach().clone() for n, p in worker.model.named_parameters()})


def test_weights_reach_engines_of_their_own_and_engines_inside_the_actor(pools):
    """The sync's two Ray paths with real HF engines: buckets through the object store into engines of their
    own (two buckets in flight), and an in-memory load into engines living in the actor's processes."""
    from rlhf_ds.rollout.hf_engine import HFRolloutEngine

    plan = plan_placement({"actor": 2, "rollout": 2}, colocate=False)
    made = create_pools(plan, use_gpu=False, cpus_per_worker=0.25)
    groups = [RoleGroup(role, cls, plan, made, use_gpu=False, cpus_per_worker=0.25, worker_args=("tiny:llama-micro",))
              for role, cls in (("actor", ToyActor), ("rollout", HFRolloutEngine))]
    actor, rollout = groups
    try:
        inside = actor.attach("inside", HFRolloutEngine, ("tiny:llama-micro",))
        want = _weights(actor)[0]
        assert not all(torch.equal(want[n], t) for n, t in _weights(rollout)[0].items())   # not there yet
        # buckets of 4 KiB: the micro model's tensors go in several buckets, more than two in flight
        for engines in (rollout, inside):
            sent = actor.sync_weights(engines, 4 / 1024, "step-1")
            assert sent == len(want) and engines.run_all("weight_version") == ["step-1", "step-1"]
            for got in _weights(engines):
                assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    finally:
        for g in reversed(groups):
            g.shutdown()
        remove_pools(made)
