"""Loss reduction by advantage pre-scaling (docs/design.md#the-loss-and-gradient-contract).

The whole mini-batch (all data-parallel ranks) is scaled once, before it is sharded. Every token gets
a weight ``w[i, t] = mask[i, t] / divisor``; the policy loss is then computed with the scaled
advantages ``A * w`` and reduced by a plain masked sum, and every other per-token term (KL, entropy,
value, SFT cross-entropy) is reduced as ``sum(term * w)``. Because the sum over any partition of the
rows is the sum over the whole, every dp / micro-batch layout yields the same objective and gradient.

| mode                       | divisor  | objective                                     |
|----------------------------|----------|-----------------------------------------------|
| ``token_mean``             | N        | mean over all loss tokens of the mini-batch   |
| ``token_mean_legacy``      | K * N_k  | mean over micro-batches of their token means  |
| ``sequence_mean``          | B * n_i  | mean over sequences of their token means      |
| ``seq_mean_token_sum_norm``| B * L    | token sums / constant L, mean over sequences  |
| ``prompt_mean``            | P * N_p  | mean over prompt groups of their token means  |

N: loss tokens; n_i: tokens of sequence i; B: sequences (empty ones included); K: micro-batches;
N_k: tokens of micro-batch k; L: ``loss_norm_len``; P: prompt groups; N_p: tokens of group p.
A zero count (empty response, micro-batch or group) gives weight 0, never a division by zero.

``token_mean_legacy`` cuts the mini-batch into consecutive chunks of ``micro_batch_size`` rows.
These are exactly the per-rank micro-batches when rows are sharded in consecutive blocks whose size
is a multiple of ``micro_batch_size``; otherwise the objective is still well defined (and layout
invariant) but is the chunking of the global batch.

Pre-scaling is exact only for policy losses positively homogeneous in the advantage
(``loss(c * A) = c * loss(A)`` for c >= 0): PPO clip, dual clip, GSPO. The config validator refuses
others (``rlhf_ds.choices.POLICY_LOSS_HOMOGENEOUS``).

The trainer computes ``token_weights`` once per mini-batch and sends them to every role; the actor
applies ``weighted_advantages`` itself. ``scale_advantages`` does both in one call.
"""
from __future__ import annotations

from typing import Optional

import torch

from rlhf_ds.choices import LOSS_REDUCTIONS


def _safe_reciprocal(count: torch.Tensor) -> torch.Tensor:
    """1 / count where count > 0, else 0 (an empty set contributes nothing)."""
    return torch.where(count > 0, 1.0 / count.clamp(min=1e-30), torch.zeros_like(count))


def token_weights(
    response_mask: torch.Tensor,
    mode: str,
    *,
    group_ids: Optional[torch.Tensor] = None,
    micro_batch_size: Optional[int] = None,
    loss_norm_len: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Per-token reduction weights of ``mode``.

    Args:
        response_mask: [B, R] 1 on loss tokens, 0 on padding (float or bool).
        mode: one of ``LOSS_REDUCTIONS``.
        group_ids: [B] prompt index of each row (``prompt_mean``).
        micro_batch_size: rows per micro-batch (``token_mean_legacy``).
        loss_norm_len: the constant L (``seq_mean_token_sum_norm``; ``Config.loss_norm_len``).
        dtype: dtype of the result (default: the mask's float dtype, else float32). Counts and
            divisors are computed in float64 so they are exact whatever the result dtype.
    Returns:
        [B, R] weights, 0 where the mask is 0.
    """
    if mode not in LOSS_REDUCTIONS:
        raise ValueError(f"algo.loss_reduction: unknown mode {mode!r}; valid choices: {list(LOSS_REDUCTIONS)}")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, R], got shape {tuple(response_mask.shape)}")
    if dtype is None:
        dtype = response_mask.dtype if response_mask.is_floating_point() else torch.float32
    mask = (response_mask != 0).to(torch.float64)
    num_rows = mask.shape[0]
    per_row = mask.sum(dim=1)  # n_i, [B]

    if mode == "token_mean":
        divisor_inv = _safe_reciprocal(per_row.sum()).expand(num_rows)
    elif mode == "sequence_mean":
        divisor_inv = _safe_reciprocal(per_row) / max(num_rows, 1)
    elif mode == "seq_mean_token_sum_norm":
        if loss_norm_len is None or loss_norm_len <= 0:
            raise ValueError(f"seq_mean_token_sum_norm needs loss_norm_len > 0, got {loss_norm_len!r}")
        divisor_inv = torch.full_like(per_row, 1.0 / (max(num_rows, 1) * loss_norm_len))
    elif mode == "token_mean_legacy":
        divisor_inv = _legacy_row_factor(per_row, micro_batch_size)
    else:
        divisor_inv = _prompt_row_factor(per_row, group_ids)
    return (mask * divisor_inv.unsqueeze(1)).to(dtype)


def _legacy_row_factor(per_row: torch.Tensor, micro_batch_size: Optional[int]) -> torch.Tensor:
    """[B] -> 1 / (K * N_k) for the chunk k holding each row."""
    if micro_batch_size is None or micro_batch_size <= 0:
        raise ValueError(f"token_mean_legacy needs micro_batch_size > 0, got {micro_batch_size!r}")
    num_rows = per_row.shape[0]
    chunk_of_row = torch.arange(num_rows, device=per_row.device) // micro_batch_size
    num_chunks = -(-num_rows // micro_batch_size)  # K, ceil
    chunk_tokens = torch.zeros(num_chunks, dtype=per_row.dtype, device=per_row.device)
    chunk_tokens.index_add_(0, chunk_of_row, per_row)
    return _safe_reciprocal(chunk_tokens)[chunk_of_row] / max(num_chunks, 1)


def _prompt_row_factor(per_row: torch.Tensor, group_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """[B] -> 1 / (P * N_p) for the group p of each row."""
    if group_ids is None:
        raise ValueError("prompt_mean needs group_ids ([B] prompt index of each row)")
    if group_ids.shape != per_row.shape:
        raise ValueError(f"group_ids must be [B]={tuple(per_row.shape)}, got {tuple(group_ids.shape)}")
    _, group_of_row = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_of_row.max().item()) + 1 if group_of_row.numel() else 0
    group_tokens = torch.zeros(num_groups, dtype=per_row.dtype, device=per_row.device)
    group_tokens.index_add_(0, group_of_row.to(per_row.device), per_row)
    return _safe_reciprocal(group_tokens)[group_of_row] / max(num_groups, 1)


def weighted_advantages(advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """advantages [B, R] * token weights [B, R] (from ``token_weights``) -> [B, R], 0 where the weight is 0.

    The policy loss of a positively homogeneous objective, computed with these and reduced by a
    masked sum, is the mode's objective over any layout of the rows.
    """
    if advantages.shape != weights.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and weights {tuple(weights.shape)} differ in shape"
        )
    # torch.where, not a product, so that garbage (even inf) on padding cannot leak as NaN.
    return torch.where(weights != 0, advantages * weights.to(advantages.dtype), torch.zeros_like(advantages))


def scale_advantages(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str,
    *,
    group_ids: Optional[torch.Tensor] = None,
    micro_batch_size: Optional[int] = None,
    loss_norm_len: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-scale one whole mini-batch's advantages for the reduction ``mode``.

    Args:
        advantages: [B, R] per-token advantages of the global mini-batch (all ranks).
        response_mask, mode, group_ids, micro_batch_size, loss_norm_len: see ``token_weights``.
    Returns:
        scaled_advantages [B, R] = ``weighted_advantages(advantages, token_weights)``, and
        token_weights [B, R], so that ``sum(loss_per_token(scaled) * mask)`` over the pieces of any
        layout is the mode's objective for a positively homogeneous loss, and
        ``sum(term * token_weights)`` reduces any other per-token term the same way.
    """
    if advantages.shape != response_mask.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and response_mask {tuple(response_mask.shape)} differ in shape"
        )
    weights = token_weights(
        response_mask,
        mode,
        group_ids=group_ids,
        micro_batch_size=micro_batch_size,
        loss_norm_len=loss_norm_len,
        dtype=advantages.dtype,
    )
    return weighted_advantages(advantages, weights), weights
