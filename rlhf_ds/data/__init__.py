"""Prompt datasets, synthetic verifiable tasks, rule-based reward functions and the scoring of generated
samples (no ray/deepspeed/vllm)."""

from rlhf_ds.data.prompts import DatasetError, PromptLoader, PromptRecord, load_prompt_dataset
from rlhf_ds.data.rewards import (REWARD_FUNCTIONS, RewardFunctionError, RewardRunner, exact_match,
                                  format_reward, load_reward_function)
from rlhf_ds.data.tasks import TASKS, generate_split, get_task

__all__ = ["DatasetError", "PromptLoader", "PromptRecord", "REWARD_FUNCTIONS", "RewardFunctionError",
           "RewardRunner", "TASKS", "exact_match", "format_reward", "generate_split",
           "get_task", "load_prompt_dataset", "load_reward_function"]
