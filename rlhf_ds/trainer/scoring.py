"""Turning generated samples into text, rewards and held-out accuracy (driver side)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from rlhf_ds.batch import Experience
from rlhf_ds.choices import NONFINITE_SCORE_POLICIES
from rlhf_ds.data.prompts import PromptRecord
from rlhf_ds.rewards.functions import exact_match
from rlhf_ds.rollout.base import RolloutSample, SamplingParams, build_experience

# generate(prompts, n, sampling, seed) -> n samples per prompt, prompt-major (an engine's, or a group's)
Generate = Callable[[list[list[int]], int, SamplingParams, int], list[RolloutSample]]


def decode(tokenizer: Any, exp: Experience, stop_ids: Sequence[int]) -> tuple[list[str], list[bool]]:
    """Response texts (special tokens dropped) and whether each stopped on one of ``stop_ids`` (the
    tokenizer's eos and the model's generation-config eos ids: ``models.tokenizer.model_stop_token_ids``)."""
    stops = set(stop_ids)
    texts, finished = [], []
    for ids, mask in zip(exp.response_ids, exp.response_mask, strict=True):
        tokens = ids[mask.bool()].tolist()
        finished.append(bool(tokens) and tokens[-1] in stops)
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


# Rule rewards are sums of weighted floats: a correct answer must not miss the threshold by round-off.
_CORRECT_TOLERANCE = 1e-9


def is_correct(scores: torch.Tensor, correct_score: float) -> torch.Tensor:
    """[B] bool: each rule reward reaches ``correct_score`` (``reward.correct_score``), up to round-off."""
    return scores >= correct_score - _CORRECT_TOLERANCE * max(1.0, abs(correct_score))


def _exact_match_runner(prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                        ) -> tuple[list[float], dict[str, float]]:
    return exact_match(prompts, responses, answers, finished), {}


def _sample_and_score(generate: Generate, tokenizer: Any, records: Sequence[PromptRecord], prompts: list[list[int]],
                      n: int, sampling: SamplingParams, pad_id: int, max_prompt_len: int, runner: Any,
                      stop_ids: Sequence[int]) -> tuple[Experience, torch.Tensor, list[bool]]:
    """``n`` samples of every prompt (seed 0: every evaluation draws alike), their rule rewards [B] and
    whether each stopped on one of ``stop_ids``."""
    samples = generate(prompts, n, sampling, 0)
    exp = build_experience(prompts, samples, pad_id, max_prompt_len, sampling.max_new_tokens)
    texts, finished = decode(tokenizer, exp, stop_ids)
    scores, _ = score_rules(runner, records, exp, texts, finished)
    return exp, scores, finished


def evaluate(generate: Generate, tokenizer: Any, records: Sequence[PromptRecord], eval_prompts: list[list[int]],
             temperature: float, max_new_tokens: int, pad_id: int, max_prompt_len: int, *,
             stop_ids: Sequence[int], runner: Optional[Any] = None, correct_score: float = 1.0, pass_k: int = 1,
             pass_k_temperature: float = 1.0) -> dict[str, float]:
    """Held-out accuracy of one sample per prompt (greedy at ``temperature`` 0), scored by the run's rules.

    stop_ids: the ids a finished response ends on (``models.tokenizer.model_stop_token_ids``).
    runner: the run's rule reward, called like :class:`~rlhf_ds.rewards.runner.RewardRunner`
      (prompts, responses, answers, finished) -> (scores, stats); None = ``exact_match``.
    A response is correct when its reward is >= ``correct_score`` (:func:`is_correct`).
    pass_k > 1: also ``pass_k`` samples per prompt at ``pass_k_temperature``; ``eval/pass@k`` is the
    fraction of prompts with at least one correct sample among them (n = k in the Codex estimator).
    Returns ``eval/accuracy``, ``eval/finished``, ``eval/reward_mean`` (of the one-sample responses) and
    ``eval/pass@<k>`` when pass_k > 1.
    """
    runner = _exact_match_runner if runner is None else runner
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    _, scores, finished = _sample_and_score(generate, tokenizer, records, eval_prompts, 1, sampling, pad_id,
                                            max_prompt_len, runner, stop_ids)
    out = {"eval/accuracy": is_correct(scores, correct_score).double().mean().item() if len(scores) else 0.0,
           "eval/finished": sum(finished) / max(len(finished), 1),
           "eval/reward_mean": scores.mean().item() if len(scores) else 0.0}
    if pass_k > 1:
        sampling = SamplingParams(temperature=pass_k_temperature, max_new_tokens=max_new_tokens)
        exp, scores, _ = _sample_and_score(generate, tokenizer, records, eval_prompts, pass_k, sampling, pad_id,
                                           max_prompt_len, runner, stop_ids)
        hits = torch.zeros(len(eval_prompts), dtype=torch.float64)
        hits.index_add_(0, exp.group_ids, is_correct(scores, correct_score).double())
        out[f"eval/pass@{pass_k}"] = (hits > 0).double().mean().item()
    return out


def response_metrics(exp: Experience, finished: list[bool], rewards: torch.Tensor,
                     rule_scores: Optional[torch.Tensor]) -> dict[str, float]:
    lengths = exp.response_mask.sum(dim=1)
    out = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
           "response/length": lengths.mean().item(), "response/length_max": lengths.max().item(),
           "response/finished": sum(finished) / max(len(finished), 1)}
    if rule_scores is not None:
        out["reward/rules_mean"] = rule_scores.mean().item()
    return out
