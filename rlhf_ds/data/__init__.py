"""Prompt datasets, synthetic verifiable tasks and rule-based reward functions (no ray/deepspeed/vllm)."""

from rlhf_ds.data.prompts import DatasetError, PromptLoader, PromptRecord, load_prompt_dataset
from rlhf_ds.data.rewards import (REWARD_FUNCTIONS, RewardFunctionError, RewardRunner, exact_match,
                                  format_reward, load_reward_function)
from rlhf_ds.data.tasks import TASKS, SftExample, generate_split, get_task, sft_examples

__all__ = ["DatasetError", "PromptLoader", "PromptRecord", "REWARD_FUNCTIONS", "RewardFunctionError",
           "RewardRunner", "SftExample", "TASKS", "exact_match", "format_reward", "generate_split",
           "get_task", "load_prompt_dataset", "load_reward_function", "sft_examples"]
