"""Train and held-out prompt records of a run, from ``cfg.data``."""
from __future__ import annotations

from rlhf_ds.config import Config
from rlhf_ds.data.prompts import SYNTHETIC_PREFIX, PromptRecord, load_prompt_dataset


def load_records(cfg: Config) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train records, held-out records). A synthetic task supplies its own disjoint held-out split."""
    data = cfg.data
    synthetic = data.train_path.startswith(SYNTHETIC_PREFIX)
    num_train = None
    if synthetic:
        from rlhf_ds.data.tasks import get_task

        # A small task (3-digit x 1-digit: 8100 problems) has fewer train problems than the default
        # data.num_train: take its whole train split then.
        task_size = get_task(data.train_path[len(SYNTHETIC_PREFIX):]).size
        num_train = data.num_train if data.num_train < 0.8 * task_size else None
    train = load_prompt_dataset(data.train_path, data.prompt_key, data.answer_key, split="train",
                                num_examples=num_train, task_seed=data.task_seed)
    if data.eval_path:
        held_out = load_prompt_dataset(data.eval_path, data.prompt_key, data.answer_key, split="eval",
                                       num_examples=data.num_eval, task_seed=data.task_seed)
    elif synthetic:
        held_out = load_prompt_dataset(data.train_path, split="eval", num_examples=data.num_eval,
                                       task_seed=data.task_seed)
    else:
        raise ValueError(f"data.eval_path is empty and data.train_path={data.train_path!r} is not synthetic: "
                         f"set data.eval_path to a held-out prompt file")
    return train, held_out
