"""Preference pairs for reward-model training: rows of prompt / chosen / rejected, and their batches.

Sources are those of prompt datasets (``data.prompts``): JSONL, parquet, a saved HF ``datasets``
directory, with the keys ``data.prompt_key`` / ``data.chosen_key`` / ``data.rejected_key``; a row that
lacks one fails with the file, the line (or row) and the key, before anything starts. ``synthetic:<task>``
makes the pairs locally: for each problem of the task, its correct answer (chosen) against the same
answer with one digit changed (rejected), a near miss that a reward model must check the arithmetic to
tell apart.

A pair is scored as two sequences, ``prompt ++ response ++ eos``, tokenized like SFT examples, so the
reward model is trained on what the RL reward worker scores: the value at a finished response's last
token (its eos).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from rlhf_ds.batch import Experience, pad_prompts, pad_responses
from rlhf_ds.data.prompts import (SYNTHETIC_PREFIX, DatasetError, PromptRecord, encode_prompts,
                                  load_prompt_dataset, load_run_records)


@dataclass(frozen=True)
class PreferenceRecord:
    """One prompt with a preferred and a dispreferred response; ``meta`` holds where it came from."""

    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def wrong_answer(answer: str, rng: np.random.Generator) -> str:
    """``answer`` with one of its digits replaced by another digit (a leading digit never by 0)."""
    positions = [i for i, c in enumerate(answer) if c.isdigit()]
    if not positions:
        raise ValueError(f"no digit to change in the answer {answer!r}")
    i = positions[int(rng.integers(len(positions)))]
    leading = i == positions[0] and len(positions) > 1
    options = [d for d in "0123456789" if d != answer[i] and not (leading and d == "0")]
    return answer[:i] + options[int(rng.integers(len(options)))] + answer[i + 1:]


def with_wrong_answers(records: Sequence[PromptRecord], seed: int, split: str) -> list[PreferenceRecord]:
    """Pairs of each record's (correct) answer against a :func:`wrong_answer`, seeded by (seed, split)."""
    rng = np.random.default_rng([seed, 1 + ("train", "eval").index(split)])
    return [PreferenceRecord(r.prompt, r.answer, wrong_answer(r.answer, rng), r.meta) for r in records]


def load_preference_dataset(path: str, prompt_key: str = "prompt", chosen_key: str = "chosen",
                            rejected_key: str = "rejected", *, split: str = "train",
                            num_examples: int | None = None, task_seed: int = 0) -> list[PreferenceRecord]:
    """Pairs from ``path`` (the sources of ``data.prompts.load_prompt_dataset``).

    Rows are read with the prompt loader's checks, once for the chosen and once for the rejected key,
    so a row without either fails with the file, the line (JSONL, 1-based) or row, and the missing key.
    """
    if path.startswith(SYNTHETIC_PREFIX):
        records = load_prompt_dataset(path, split=split, num_examples=num_examples, task_seed=task_seed)
        return with_wrong_answers(records, task_seed, split)
    chosen = load_prompt_dataset(path, prompt_key, chosen_key, split=split, num_examples=num_examples)
    rejected = load_prompt_dataset(path, prompt_key, rejected_key, split=split, num_examples=num_examples)
    return [PreferenceRecord(c.prompt, c.answer, r.answer, c.meta) for c, r in zip(chosen, rejected, strict=True)]


def load_preference_records(data: Any) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train pairs, held-out pairs) of a run's ``data`` section; a synthetic task supplies its own
    disjoint held-out split (as ``load_run_records``)."""
    if data.train_path.startswith(SYNTHETIC_PREFIX) and not data.eval_path:
        train, held_out = load_run_records(data)
        return with_wrong_answers(train, data.task_seed, "train"), with_wrong_answers(held_out, data.task_seed, "eval")
    if not data.eval_path:
        raise DatasetError(f"data.eval_path is empty and data.train_path={data.train_path!r} is not synthetic: "
                           f"set data.eval_path to held-out preference pairs")
    keys = (data.prompt_key, data.chosen_key, data.rejected_key)
    train = load_preference_dataset(data.train_path, *keys, split="train", task_seed=data.task_seed)
    held_out = load_preference_dataset(data.eval_path, *keys, split="eval", num_examples=data.num_eval,
                                       task_seed=data.task_seed)
    return train, held_out


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a response as the policy emits it: the text, then eos (no bos)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class PreferenceBatch:
    """Preference pairs: row i of ``chosen`` and row i of ``rejected`` share a prompt.

    Both Experiences have the same prompt and response lengths (P, R), so one forward can score the
    two halves together. Rows are sliced together (``batch[a:b]``), which is how the groups cut a batch
    into rank shards, so a pair is never split.
    """
    chosen: Experience                            # [B] prompt ++ preferred response ++ eos
    rejected: Experience                          # [B] the same prompts ++ dispreferred response ++ eos
    pair_weights: Optional[torch.Tensor] = None   # [B] loss weight of each pair (1 / pairs of its mini-batch)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: slice) -> "PreferenceBatch":
        if not isinstance(index, slice):
            raise TypeError(f"PreferenceBatch takes slices of pairs, got {type(index).__name__}")
        weights = self.pair_weights[index] if self.pair_weights is not None else None
        return PreferenceBatch(self.chosen.select(index), self.rejected.select(index), weights)

    def chunk(self, size: int) -> list["PreferenceBatch"]:
        """Consecutive pieces of ``size`` pairs (the last may be shorter)."""
        return [self[start:start + size] for start in range(0, len(self), size)]

    def both(self) -> Experience:
        """[2B] rows: the chosen sequences, then the rejected ones (one forward scores a pair)."""
        return Experience.cat([self.chosen, self.rejected])

    def replace(self, **changes) -> "PreferenceBatch":
        return replace(self, **changes)


def build_preference_batch(tokenizer: Any, records: Sequence[PreferenceRecord], max_prompt_len: int, *,
                           chat_template: bool = False) -> PreferenceBatch:
    """Tokenize and pad pairs (prompts left-padded to a common P, responses right-padded to a common R);
    prompts longer than ``max_prompt_len`` tokens are refused. chat_template: prompts in the tokenizer's
    chat template, as the policy saw them (``data.apply_chat_template``)."""
    prompts = encode_prompts(tokenizer, records, max_prompt_len, chat_template=chat_template)
    chosen = [encode_response(tokenizer, r.chosen) for r in records]
    rejected = [encode_response(tokenizer, r.rejected) for r in records]
    pad_id = tokenizer.pad_token_id
    prompt_ids, prompt_mask = pad_prompts(prompts, pad_id)
    length = max(len(ids) for ids in chosen + rejected)
    group_ids = torch.arange(len(records))

    def half(responses: list[list[int]]) -> Experience:
        response_ids, response_mask = pad_responses(responses, pad_id, length)
        return Experience(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                          response_mask=response_mask, group_ids=group_ids)

    return PreferenceBatch(half(chosen), half(rejected))
