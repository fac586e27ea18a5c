"""Prompt datasets, synthetic verifiable tasks, preference pairs and the scoring of generated samples
(no ray/deepspeed/vllm). The reward functions are the ``rlhf_ds.rewards`` package."""

from rlhf_ds.data.prompts import DatasetError, PromptLoader, PromptRecord, load_prompt_dataset
from rlhf_ds.data.tasks import TASKS, generate_split, get_task

__all__ = ["DatasetError", "PromptLoader", "PromptRecord", "TASKS", "generate_split", "get_task",
           "load_prompt_dataset"]
