"""Per-token losses: policy (PPO clip, GSPO), value, KL estimators, truncated importance sampling.

Every loss here is per token, shape [B, R]; the caller reduces it with a masked sum (policy loss,
computed with advantages pre-scaled by ``algo.reduction.scale_advantages``) or with
``sum(term * token_weights)`` (every other term). No loss here averages over tokens (only the
diagnostic stats do), so no loss can disagree with the chosen reduction mode.

Departures from the papers, on purpose:

* Log-ratios are clamped to [-20, 20] before ``exp`` (ratio ~5e8): a token so far off-policy has
  no useful gradient and an unclamped ``exp`` overflows in bf16 / fp16.
* GSPO (Zheng et al. 2025, arXiv:2507.18071) is written in its token form ("GSPO-token"): the ratio of
  token t of sequence i is ``sg[s_i] * pi(y_t) / sg[pi(y_t)]`` with ``s_i = exp(mean_t log-ratio)``.
  Its value is the sequence ratio and its gradient is ``s_i * grad log pi(y_t)``; reduced with
  ``sequence_mean`` it is exactly the paper's sequence objective, and it can be reduced with any
  other mode like every other loss.

Settings are not checked again here: the config validator (rlhf_ds/config.py) is the one place that
refuses a clip range outside [0, 1) or a dual clip that is neither 0 nor > 1.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from rlhf_ds.algo.metrics import MetricKind
from rlhf_ds.choices import KL_ESTIMATORS

LOG_RATIO_CLAMP = 20.0

# Kinds of the stats returned by policy_loss: each is a statistic of the tokens it was given.
# approx_kl is the k3 estimate of KL(pi_theta || pi_old), a drift diagnostic (not a loss term).
POLICY_STAT_KINDS: dict[str, MetricKind] = {
    "clip_frac": MetricKind.MEAN,
    "clip_frac_low": MetricKind.MEAN,
    "clip_frac_high": MetricKind.MEAN,
    "dual_clip_frac": MetricKind.MEAN,
    "approx_kl": MetricKind.MEAN,
    "ratio_mean": MetricKind.MEAN,
    "ratio_max": MetricKind.MAX,
}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-dim mean of x over mask (0 when the mask is empty)."""
    x = torch.where(mask, x, torch.zeros_like(x))
    return x.sum() / mask.sum().clamp(min=1)


def _clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with clip-higher and dual clip, per token.

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); for A < 0 and dual_clip = c > 1 the
    loss is further capped at -c A (Ye et al. 2020, arXiv:1912.09729), bounding the step taken on a
    token whose ratio exploded. Positively homogeneous in A: every branch is linear in A and the
    branch choice depends only on the sign of A.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    dual_active = torch.zeros_like(negative)
    if dual_clip > 0.0:
        cap = -advantages * dual_clip
        dual_active = negative & (loss > cap)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    with torch.no_grad():
        high = (advantages > 0) & (ratio > 1.0 + clip_high)
        low = negative & (ratio < 1.0 - clip_low)
        stats = {
            "clip_frac": _masked_mean((high | low).to(ratio.dtype), mask),
            "clip_frac_low": _masked_mean(low.to(ratio.dtype), mask),
            "clip_frac_high": _masked_mean(high.to(ratio.dtype), mask),
            "dual_clip_frac": _masked_mean(dual_active.to(ratio.dtype), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, torch.full_like(ratio, -torch.inf)).max()
            if mask.any()
            else ratio.new_zeros(()),
        }
    return loss, stats


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017) with token ratio r = exp(logprobs - old_logprobs).

    Args: logprobs [B, R] (with grad), old_logprobs [B, R], advantages [B, R] (pre-scaled),
    response_mask [B, R]. Returns: loss [B, R] (0 is not enforced on padding: reduce with the mask),
    stats (0-dim tensors).
    """
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    mask = response_mask != 0
    return _clipped_surrogate(log_ratio.exp(), advantages, mask, clip_low, clip_high, dual_clip)


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token: sequence-level ratio s_i = exp(mean over the sequence of log-ratios), token gradient.

    Shapes as ``ppo_policy_loss``. Clipping acts on s_i, so it keeps or drops whole sequences.
    An empty response has s_i = 1 and no tokens.
    """
    mask = response_mask != 0
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    num_tokens = mask.sum(dim=1, keepdim=True).clamp(min=1)
    seq_log_ratio = (log_ratio.sum(dim=1, keepdim=True) / num_tokens).detach()
    # value: sg[log s_i]; gradient: grad log pi(y_t) (the stop-gradient trick of GSPO-token).
    token_log_ratio = seq_log_ratio + logprobs - logprobs.detach()
    ratio = token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    return _clipped_surrogate(ratio, advantages, mask, clip_low, clip_high, dual_clip)


PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

# Name -> function of every `algo.policy_loss` choice. Whether a loss is homogeneous in the advantage
# (which pre-scaling needs) is recorded once, in rlhf_ds.choices.POLICY_LOSS_HOMOGENEOUS, and enforced
# by the config validator.
POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo": ppo_policy_loss, "gspo": gspo_policy_loss}


def get_policy_loss(name: str) -> PolicyLossFn:
    """The function of the policy loss ``name``."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"algo.policy_loss: unknown loss {name!r}; valid choices: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def policy_loss(
    name: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
    is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss ``name`` [B, R] and its stats (see ``POLICY_STAT_KINDS``).

    ``is_weights`` [B, R] (from ``truncated_is_weights``) multiplies the loss per token; it is
    detached here so it never carries gradient. Stats are means over the masked tokens given.
    """
    loss_fn = get_policy_loss(name)
    shape = logprobs.shape
    for label, tensor in (("old_logprobs", old_logprobs), ("advantages", advantages), ("response_mask", response_mask)):
        if tensor.shape != shape:
            raise ValueError(f"{label} has shape {tuple(tensor.shape)}, logprobs {tuple(shape)}")
    mask = response_mask != 0
    loss, stats = loss_fn(
        logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    if is_weights is not None:
        if is_weights.shape != shape:
            raise ValueError(f"is_weights has shape {tuple(is_weights.shape)}, logprobs {tuple(shape)}")
        loss = loss * is_weights.detach()
    with torch.no_grad():
        stats["approx_kl"] = _masked_mean(kl_penalty(logprobs.detach(), old_logprobs, "k3"), mask)
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: Optional[float]
) -> torch.Tensor:
    """Clipped value loss per token [B, R]: 0.5 * max((V - G)^2, (V_clip - G)^2).

    V_clip = old_values + clamp(values - old_values, -clip, clip); ``clip`` None or <= 0 turns
    clipping off (0.5 * (V - G)^2).
    """
    error = values - returns
    if clip is None or clip <= 0:
        return 0.5 * error.square()
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum(error.square(), (clipped_values - returns).square())


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL").

    With x = logprobs - ref_logprobs: k1 = x; k2 = x^2 / 2; k3 = exp(-x) + x - 1 (unbiased and
    >= 0; x is clamped to [-20, 20] before exp so it cannot overflow). Shapes: [B, R] -> [B, R].
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"algo.kl_estimator: unknown estimator {estimator!r}; valid choices: {list(KL_ESTIMATORS)}")
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(-log_ratio) + log_ratio


def truncated_is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    cap: float,
    response_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_rollout, cap) per token [B, R], detached.

    Corrects for the rollout engine (vLLM, sampling kernels, other precision) scoring tokens slightly
    differently from the trainer. The log-ratio is capped at log(cap) before exp, so it cannot
    overflow; padding (mask 0) gets weight 0.
    """
    if cap <= 0:
        raise ValueError(f"algo.tis_cap must be > 0, got {cap}")
    with torch.no_grad():
        log_ratio = (old_logprobs - rollout_logprobs).clamp(max=math.log(cap))
        weights = log_ratio.exp()
        if response_mask is not None:
            weights = torch.where(response_mask != 0, weights, torch.zeros_like(weights))
    return weights
