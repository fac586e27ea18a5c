"""Rewards from rules: the reward functions (``functions``: built-ins, the loader of user functions), the
isolated worker processes that run them (``pool``, with ``processes``), the code sandbox of ``code_tests``
(``sandbox``) and the runner that calls and combines them (``runner``). The reward model is a role of its
own (``workers.reward_model``)."""
from rlhf_ds.rewards.functions import REWARD_FUNCTIONS, RewardFunctionError, load_reward_function
from rlhf_ds.rewards.runner import RewardRunner, runner_from_config

__all__ = ["REWARD_FUNCTIONS", "RewardFunctionError", "RewardRunner", "load_reward_function", "runner_from_config"]
