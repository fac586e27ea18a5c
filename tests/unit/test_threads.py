"""Threads follow the work: a worker alone in its stages gets every core; workers busy together share."""
from rlhf_ds.cluster.roles import role_ranks
from rlhf_ds.cluster.threads import worker_threads
from rlhf_ds.config import load_config

PPO_ROLES = ["reference.model_path=tiny:llama-arith", "critic.model_path=tiny:llama-arith"]


def _threads(recipe, *overrides, cores=2):
    cfg = load_config(recipe, list(overrides))
    return worker_threads(cfg, role_ranks(cfg), cores)


SEPARATE = "rollout.hf_in_actor=false"   # engines as Ray actors of their own


def test_grpo_default_every_stage_has_one_worker_so_each_takes_both_cores():
    assert _threads("grpo_tiny", SEPARATE) == {"actor": 2, "rollout": 2}
    # the default: the engine inside the actor's process generates on the actor's threads
    assert _threads("grpo_tiny") == {"actor": 2}
    assert _threads("grpo_tiny", "actor.num_ranks=2") == {"actor": 1}   # two ranks generate at once


def test_concurrent_ranks_and_roles_share_the_cores():
    assert _threads("grpo_tiny", SEPARATE, "actor.num_ranks=2") == {"actor": 1, "rollout": 2}
    assert _threads("grpo_tiny", SEPARATE, "rollout.num_engines=2", cores=8) == {"actor": 8, "rollout": 4}
    # PPO: reference and critic passes run together (and the actor's: not an on-policy update)
    threads = _threads("ppo_tiny", SEPARATE, *PPO_ROLES)
    assert threads["reference"] == threads["critic"] == threads["actor"] == 1 and threads["rollout"] == 2
    assert _threads("ppo_tiny", SEPARATE, *PPO_ROLES, cores=16) == {"actor": 5, "critic": 5, "reference": 5,
                                                                    "rollout": 16}
    # asynchronous generation keeps engines of their own, busy in every stage
    assert _threads("grpo_tiny", "rollout.async_generation=true") == {"actor": 1, "rollout": 1}


def test_explicit_threads_win():
    assert _threads("grpo_tiny", SEPARATE, "cluster.threads_per_worker=1") == {"actor": 1, "rollout": 1}
