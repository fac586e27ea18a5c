"""Turning generated samples into text, rewards and held-out accuracy (driver side)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from rlhf_ds.batch import Experience
from rlhf_ds.data.prompts import PromptRecord
from rlhf_ds.data.rewards import exact_match
from rlhf_ds.rollout.base import RolloutSample, SamplingParams, build_experience

# generate(prompts, n, sampling, seed) -> n samples per prompt, prompt-major (an engine's, or a group's)
Generate = Callable[[list[list[int]], int, SamplingParams, int], list[RolloutSample]]


def decode(tokenizer: Any, exp: Experience) -> tuple[list[str], list[bool]]:
    """Response texts (special tokens dropped) and whether each stopped on eos."""
    eos = tokenizer.eos_token_id
    texts, finished = [], []
    for ids, mask in zip(exp.response_ids, exp.response_mask):
        tokens = ids[mask.bool()].tolist()
        finished.append(bool(tokens) and tokens[-1] == eos)
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts, finished


def score_rules(runner: Any, records: Sequence[PromptRecord], exp: Experience, texts: list[str],
                finished: list[bool]) -> tuple[torch.Tensor, dict[str, float]]:
    rows = [records[int(g)] for g in exp.group_ids]
    scores, stats = runner([r.prompt for r in rows], texts, [r.answer for r in rows], finished)
    return torch.tensor(scores, dtype=torch.float32), {f"reward/{k}": float(v) for k, v in stats.items()}


def evaluate(generate: Generate, tokenizer: Any, records: Sequence[PromptRecord], eval_prompts: list[list[int]],
             temperature: float, max_new_tokens: int, pad_id: int, max_prompt_len: int) -> dict[str, float]:
    """Held-out exact match (answer and eos) of one sample per prompt, greedy by default."""
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    samples = generate(eval_prompts, 1, sampling, 0)
    exp = build_experience(eval_prompts, samples, pad_id, max_prompt_len, max_new_tokens)
    texts, finished = decode(tokenizer, exp)
    correct = exact_match([r.prompt for r in records], texts, [r.answer for r in records], finished)
    return {"eval/accuracy": sum(correct) / max(len(correct), 1),
            "eval/finished": sum(finished) / max(len(finished), 1)}


def response_metrics(exp: Experience, finished: list[bool], rewards: torch.Tensor,
                     rule_scores: Optional[torch.Tensor]) -> dict[str, float]:
    lengths = exp.response_mask.sum(dim=1)
    out = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
           "response/length": lengths.mean().item(), "response/length_max": lengths.max().item(),
           "response/finished": sum(finished) / max(len(finished), 1)}
    if rule_scores is not None:
        out["reward/rules_mean"] = rule_scores.mean().item()
    return out
