"""Advantage estimators over a rollout batch.

Inputs are one rollout batch: ``scores`` [B] (one scalar reward per sequence), ``group_ids`` [B]
(rows answering the same prompt share an id), ``response_mask`` [B, R] (right-padded responses:
the mask of a row is a prefix of ones). Outputs are per token, 0 on padding.

Robustness, shared by every estimator:

* a group whose rewards are all equal (including a group of one) gets advantage exactly 0;
* a non-finite score (NaN / inf, e.g. a crashed reward function) is masked: the row is left out of
  every statistic (group means, batch whitening) and gets advantage and return 0. The number of
  such rows is returned as ``AdvantageOutput.num_nonfinite`` so the trainer can log it;
* statistics (group means and stds, whitening, returns) are computed in float64 and the result is cast
  back to the scores' dtype: in float32 the squared deviations of rewards near 1e20 overflow (every
  advantage became 0) and a group mean near 1e7 loses the differences between its members.

Estimators (``ADVANTAGE_ESTIMATORS``, declared in rlhf_ds/choices.py):

* ``grpo``: (r - mean_g) / (std_g + eps), unbiased std over the group (Shao et al. 2024).
* ``grpo_no_std``: r - mean_g (Dr. GRPO, Liu et al. 2025).
* ``rloo``: r - mean of the other samples of the group (Ahmadian et al. 2024).
* ``reinforce_pp``: discounted return of token rewards, whitened over the batch (Hu 2025).
* ``reinforce_pp_baseline``: group mean subtracted from the score first, then as ``reinforce_pp``.
* ``gae``: generalised advantage estimation with a critic (Schulman et al. 2016); returns = A + V.

Token rewards (``TOKEN_REWARD_ESTIMATORS``: ``reinforce_pp*``, ``gae``) are the score on the last
response token minus ``kl_coef * kl`` on every token (KL-in-reward shaping), see
``kl_shaped_token_rewards``. The other estimators have no token rewards and ignore ``kl``; the config
refuses ``algo.kl_placement=reward`` with them (rlhf_ds/config.py, the one place that rule lives).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from rlhf_ds.choices import ADVANTAGE_ESTIMATORS, TOKEN_REWARD_ESTIMATORS


class AdvantageOutput(NamedTuple):
    advantages: torch.Tensor  # [B, R], 0 on padding and on rows with a non-finite score
    returns: torch.Tensor  # [B, R], critic targets (gae), discounted returns (reinforce_pp*), else advantages
    num_nonfinite: int  # rows whose score was NaN / inf


class _Groups(NamedTuple):
    row_group: torch.Tensor  # [B] dense group index 0..G-1 of each row
    finite_count: torch.Tensor  # [G] finite rows per group
    total: torch.Tensor  # [G] sum of finite scores
    all_equal: torch.Tensor  # [B] bool: the row's group has one distinct finite score


def _finite_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """scores [B] -> (scores with non-finite entries set to 0, finite mask [B], count of non-finite)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    finite = torch.isfinite(scores)
    return torch.where(finite, scores, torch.zeros_like(scores)), finite, int((~finite).sum().item())


def _group_stats(scores: torch.Tensor, finite: torch.Tensor, group_ids: torch.Tensor) -> _Groups:
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_ids must be [B]={tuple(scores.shape)}, got {tuple(group_ids.shape)}")
    _, index = torch.unique(group_ids, return_inverse=True)
    index = index.to(scores.device)
    num_groups = int(index.max().item()) + 1 if index.numel() else 0
    zeros = scores.new_zeros(num_groups)
    count = zeros.index_add(0, index, finite.to(scores.dtype))
    total = zeros.index_add(0, index, scores)
    inf = torch.full_like(scores, torch.inf)
    high = zeros.scatter_reduce(0, index, torch.where(finite, scores, -inf), "amax", include_self=False)
    low = zeros.scatter_reduce(0, index, torch.where(finite, scores, inf), "amin", include_self=False)
    return _Groups(index, count, total, (high == low)[index])


def group_baseline_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, mode: str, eps: float = 1e-6
) -> tuple[torch.Tensor, int]:
    """Sequence-level advantages [B] from group statistics, and the count of non-finite scores.

    mode: "grpo" (mean and std), "grpo_no_std" (mean only), "rloo" (leave-one-out mean),
    "mean" (group mean subtracted; used by reinforce_pp_baseline). Computed in float64, returned in
    the dtype of ``scores``.
    """
    clean, finite, num_nonfinite = _finite_scores(scores.to(torch.float64))
    groups = _group_stats(clean, finite, group_ids)
    count = groups.finite_count[groups.row_group]
    mean = groups.total[groups.row_group] / count.clamp(min=1)
    centered = clean - mean
    if mode == "grpo":
        squared = torch.where(finite, centered.square(), torch.zeros_like(centered))
        var = squared.new_zeros(groups.finite_count.shape).index_add(0, groups.row_group, squared)
        std = (var / (groups.finite_count - 1).clamp(min=1)).sqrt()[groups.row_group]
        advantages = centered / (std + eps)
    elif mode in ("grpo_no_std", "mean"):
        advantages = centered
    elif mode == "rloo":
        # r_i - (S - r_i) / (n - 1) = n / (n - 1) * (r_i - mean)
        advantages = centered * count / (count - 1).clamp(min=1)
    else:
        raise ValueError(f"unknown group baseline mode {mode!r}; valid: ['grpo', 'grpo_no_std', 'rloo', 'mean']")
    keep = finite & ~groups.all_equal
    return torch.where(keep, advantages, torch.zeros_like(advantages)).to(scores.dtype), num_nonfinite


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the masked tokens of the whole batch; 0 on padding.

    values, mask: [B, R]. Unbiased variance (N - 1) when N > 1. With ``shift_mean=False`` only the
    scale changes. An empty mask returns zeros. Computed in float64, returned in the dtype of ``values``.
    """
    keep = mask != 0
    count = keep.sum()
    if count == 0:
        return torch.zeros_like(values)
    wide = values.to(torch.float64)
    masked = torch.where(keep, wide, torch.zeros_like(wide))
    mean = masked.sum() / count
    deviation = torch.where(keep, wide - mean, torch.zeros_like(wide))
    var = deviation.square().sum() / (count - 1).clamp(min=1)
    centered = deviation if shift_mean else masked
    return (centered * torch.rsqrt(var + eps)).to(values.dtype)


def kl_shaped_token_rewards(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Token rewards [B, R]: score on the last response token, minus ``kl_coef * kl`` on every token.

    scores [B] (finite), response_mask [B, R], kl [B, R] per-token KL estimate (``kl_penalty``).
    An empty response has no token to carry its score: its row is all zeros.
    """
    keep = response_mask != 0
    positions = torch.arange(1, keep.shape[1] + 1, device=keep.device)
    last = (keep * positions).argmax(dim=1, keepdim=True)  # [B, 1] index of the last kept token
    rewards = torch.zeros(keep.shape, dtype=scores.dtype, device=scores.device)
    rewards.scatter_(1, last, scores.unsqueeze(1))
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * kl.to(rewards.dtype)
    return torch.where(keep, rewards, torch.zeros_like(rewards))


def discounted_returns(token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} within each response; [B, R] -> [B, R], 0 on padding."""
    keep = (response_mask != 0).to(token_rewards.dtype)
    returns = torch.zeros_like(token_rewards)
    running = token_rewards.new_zeros(token_rewards.shape[0])
    for t in reversed(range(token_rewards.shape[1])):
        running = (token_rewards[:, t] + gamma * running) * keep[:, t]
        returns[:, t] = running
    return returns


def gae_advantages(
    token_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over right-padded responses.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0: the episode ends),
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V. All [B, R]; 0 on padding.
    """
    keep = (response_mask != 0).to(values.dtype)
    rewards = token_rewards * keep
    values = torch.where(keep != 0, values, torch.zeros_like(values))
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * keep[:, t]
        next_value = values[:, t]  # already 0 on padding
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * keep


@torch.no_grad()
def compute_advantages(
    estimator: str,
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    values: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
    eps: float = 1e-6,
) -> AdvantageOutput:
    """Advantages [B, R] of ``estimator`` for one rollout batch.

    Args:
        scores [B]; response_mask [B, R]; group_ids [B];
        values [B, R] old critic values (``gae`` only);
        kl [B, R] per-token KL to the reference, shaped into the token rewards with ``kl_coef``
            (``TOKEN_REWARD_ESTIMATORS`` only; the others have no token rewards and ignore it);
        gamma, lam: discount and GAE lambda; whiten: extra batch whitening for grpo / rloo / gae
        (``reinforce_pp*`` always whiten); eps: GRPO std epsilon.

    Every step runs in float64; advantages and returns come back in the dtype of ``scores``.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"algo.advantage_estimator: unknown {estimator!r}; valid choices: {list(ADVANTAGE_ESTIMATORS)}"
        )
    dtype, scores = scores.dtype, scores.to(torch.float64)
    clean, finite, num_nonfinite = _finite_scores(scores)

    def output(advantages: torch.Tensor, returns: torch.Tensor) -> AdvantageOutput:
        return AdvantageOutput(advantages.to(dtype), returns.to(dtype), num_nonfinite)

    mask = (response_mask != 0) & finite.unsqueeze(1)
    if estimator not in TOKEN_REWARD_ESTIMATORS:  # grpo, grpo_no_std, rloo: one advantage per sequence
        seq_adv, _ = group_baseline_advantages(scores, group_ids, estimator, eps)
        advantages = torch.where(mask, seq_adv.unsqueeze(1).expand_as(mask), torch.zeros_like(mask, dtype=clean.dtype))
        if whiten:
            advantages = masked_whiten(advantages, mask)
        return output(advantages, advantages)
    if estimator == "reinforce_pp_baseline":
        clean, _ = group_baseline_advantages(scores, group_ids, "mean")
    token_rewards = kl_shaped_token_rewards(clean, mask, kl, kl_coef)
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage_estimator 'gae' needs critic values ([B, R])")
        advantages, returns = gae_advantages(token_rewards, values.to(clean.dtype), mask, gamma, lam)
        if whiten:
            advantages = masked_whiten(advantages, mask)
        return output(advantages, returns)
    returns = discounted_returns(token_rewards, mask, gamma)
    return output(masked_whiten(returns, mask), returns)
