"""Rewards from rules: the reward functions (``functions``: built-ins, the loader of user functions), the
isolated worker processes that run them (``pool``, with ``processes``), the code sandbox of ``code_tests``
(``sandbox``) and the runner that calls and combines them (``runner``). Rewards over HTTP: the JSON schema
(``schema``), the client (``remote``) and the server of `rlhf-ds serve-reward` (``server``); ``sources``
joins the functions and a remote endpoint into a run's rule-side reward. The reward model is a role of its
own (``workers.reward_model``)."""
from rlhf_ds.rewards.functions import REWARD_FUNCTIONS, RewardFunctionError, load_reward_function
from rlhf_ds.rewards.remote import RemoteReward
from rlhf_ds.rewards.runner import RewardRunner
from rlhf_ds.rewards.sources import CombinedReward, runner_from_config

__all__ = ["REWARD_FUNCTIONS", "CombinedReward", "RemoteReward", "RewardFunctionError", "RewardRunner",
           "load_reward_function", "runner_from_config"]
