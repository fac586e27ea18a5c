"""Turning generated samples into text, rewards and held-out accuracy (driver side)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from rlhf_ds.batch import Experience
from rlhf_ds.choices import NONFINITE_SCORE_POLICIES
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
    return torch.tensor(scores, dtype=torch.float64), {f"reward/{k}": float(v) for k, v in stats.items()}


def clean_model_scores(scores: torch.Tensor, policy: str,
                       failure_value: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-model scores [B] with NaN / inf replaced per ``reward.nonfinite_model_score``.

    policy "failure_value": each non-finite score becomes ``failure_value``; "fail": any non-finite
    score raises. A step in which no score is finite raises under either policy: the reward model is
    broken, and scoring every sample ``failure_value`` would train on a constant reward unnoticed.
    Returns the cleaned scores (same dtype) and ``{"reward/model_nonfinite": count}``.
    """
    if policy not in NONFINITE_SCORE_POLICIES:
        raise ValueError(f"reward.nonfinite_model_score: unknown policy {policy!r}; valid choices: "
                         f"{', '.join(map(repr, NONFINITE_SCORE_POLICIES))}")
    finite = torch.isfinite(scores)
    num_nonfinite = int((~finite).sum().item())
    if scores.numel() and num_nonfinite == scores.numel():
        raise ValueError(f"the reward model produced no finite score in this step ({num_nonfinite} of "
                         f"{scores.numel()} scores are NaN / inf), which stops the run whatever "
                         f"reward.nonfinite_model_score says; check the reward model and its inputs")
    if num_nonfinite and policy == "fail":
        raise ValueError(f"the reward model produced {num_nonfinite} non-finite (NaN / inf) scores of "
                         f"{scores.numel()} with reward.nonfinite_model_score='fail'; set "
                         f"reward.nonfinite_model_score='failure_value' to score them reward.failure_value")
    cleaned = torch.where(finite, scores, torch.full_like(scores, failure_value))
    return cleaned, {"reward/model_nonfinite": float(num_nonfinite)}


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
