"""Pure pieces of cluster/: batch cutting by rank, result concatenation, placement planning."""
import pytest
import torch

from rlhf_ds.batch import Experience
from rlhf_ds.cluster.dispatch import concat_results, split_by_rank
from rlhf_ds.cluster.placement import plan_placement


def _exp(rows: int) -> Experience:
    return Experience(prompt_ids=torch.arange(rows * 3).view(rows, 3), prompt_mask=torch.ones(rows, 3),
                      response_ids=torch.arange(rows * 2).view(rows, 2), response_mask=torch.ones(rows, 2),
                      group_ids=torch.arange(rows) // 2, rewards=torch.arange(rows, dtype=torch.float))


def test_split_is_contiguous_in_rank_order_and_concat_inverts_it():
    exp = _exp(6)
    shards = split_by_rank(exp, 3)
    assert [s.rewards.tolist() for s in shards] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    back = concat_results(shards)
    for name, value in exp.tensors().items():
        assert torch.equal(back.tensors()[name], value)


def test_uneven_split_refused_for_collective_work_allowed_otherwise():
    with pytest.raises(ValueError, match="cannot be split evenly over 4 ranks"):
        split_by_rank(_exp(6), 4)
    assert [len(s) for s in split_by_rank(list(range(7)), 3, even=False)] == [3, 2, 2]


def test_concat_of_structured_results():
    parts = [(torch.ones(2), [1], {"a": torch.zeros(1)}), (torch.zeros(1), [2, 3], {"a": torch.ones(2)})]
    tensor, items, mapping = concat_results(parts)
    assert tensor.tolist() == [1.0, 1.0, 0.0] and items == [1, 2, 3] and mapping["a"].tolist() == [0, 1, 1]
    assert concat_results([None, None]) is None
    with pytest.raises(TypeError, match="cannot concatenate"):
        concat_results([1.5, 2.5])


def test_placement_separate_pools_without_colocation():
    plan = plan_placement({"actor": 2, "critic": 2, "reference": 1, "reward": 0, "rollout": 1}, colocate=False)
    assert plan.pool_sizes == {"actor": 2, "critic": 2, "reference": 1, "rollout": 1}
    assert plan.roles["actor"].share == 1.0
    assert plan.total_cpus(False, 0.25) == pytest.approx(1.5)
    assert plan.rank_resources("critic", True, 0.25) == {"num_gpus": 1.0, "num_cpus": 1.0}


def test_colocated_roles_share_bundles():
    plan = plan_placement({"actor": 2, "critic": 1, "reference": 2, "rollout": 1}, colocate=True)
    assert plan.pool_sizes == {"colocated": 2, "critic": 1}
    assert plan.roles["reference"].bundle_indices == (0, 1) and plan.roles["rollout"].bundle_indices == (0,)
    assert plan.rank_resources("actor", True, 0.25)["num_gpus"] == pytest.approx(1 / 3)
    assert plan.rank_resources("actor", False, 0.3)["num_cpus"] == pytest.approx(0.1)


def test_both_group_kinds_implement_the_group_interface():
    """The trainer is written against cluster.group.Group: each implementation has every verb, with the
    same parameters (a drifted signature would only fail under one launcher)."""
    import inspect

    from rlhf_ds.cluster.group import Group
    from rlhf_ds.cluster.spmd_group import SpmdGroup

    ray_group = pytest.importorskip("rlhf_ds.cluster.ray_group")
    verbs = [name for name, member in vars(Group).items()
             if callable(member) and not name.startswith("_")]
    assert {"run_all", "dispatch", "sync_weights", "shutdown"} <= set(verbs)
    for cls in (ray_group.RoleGroup, SpmdGroup):
        for verb in verbs:
            want = list(inspect.signature(getattr(Group, verb)).parameters)
            got = list(inspect.signature(getattr(cls, verb)).parameters)
            assert got == want, (cls.__name__, verb, got, want)
    assert isinstance(SpmdGroup("actor", dict), Group)   # role and num_ranks too
