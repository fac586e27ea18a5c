"""The losses of the two supervised stages: SFT cross-entropy and the pairwise reward-model loss.

Both follow the loss contract (docs/design.md#the-loss-and-gradient-contract): the weights are computed once on the whole mini-batch,
before it is sharded, and each piece's loss is a plain weighted *sum*, so the pieces of any dp x
micro-batch layout add up to the mini-batch objective.

- SFT: ``sum(w * nll)`` over the response tokens, with the ``token_mean`` weights of
  ``algo.reduction.token_weights`` (w = mask / N, N = response tokens of the mini-batch): the true
  token mean of the mini-batch, not a mean of per-micro-batch means.
- Reward model (Bradley-Terry; Ouyang et al. 2022, arXiv:2203.02155, eq. 1):
  ``sum(v * -log sigmoid(r_chosen - r_rejected))`` with pair weights v = 1 / num_pairs of the
  mini-batch (:func:`pair_weights`): the mean over the mini-batch's pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_nll_sum(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted negative log-likelihood of the response tokens: ``sum(w * -logprobs)``.

    logprobs [B, R] log pi(target token); weights [B, R] (``token_weights(mask, "token_mean")`` of the
    whole mini-batch, 0 on padding). Returns a scalar; the pieces of a mini-batch sum to its token mean.
    Padding never leaks: a position with weight 0 contributes exactly 0, even when its log-prob is -inf.
    """
    if logprobs.shape != weights.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and weights {tuple(weights.shape)} differ in shape")
    nll = torch.where(weights != 0, -logprobs, torch.zeros_like(logprobs))
    return (nll * weights.to(logprobs.dtype)).sum()


def pair_weights(num_pairs: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[num_pairs] weights 1 / num_pairs: a weighted sum over the pairs is their mean."""
    if num_pairs < 1:
        raise ValueError(f"a mini-batch needs at least one pair, got {num_pairs}")
    return torch.full((num_pairs,), 1.0 / num_pairs, dtype=dtype)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair loss ``-log sigmoid(r_chosen - r_rejected)`` ([B], [B] -> [B]), computed as
    ``softplus(r_rejected - r_chosen)`` so that a large margin neither overflows nor loses precision."""
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(f"chosen {tuple(chosen_scores.shape)} and rejected {tuple(rejected_scores.shape)} "
                         f"scores must both be [B]")
    return F.softplus(rejected_scores - chosen_scores)


def pairwise_loss_sum(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, weights: torch.Tensor
                      ) -> torch.Tensor:
    """``sum(v * bradley_terry_loss)`` with the mini-batch's pair weights v [B] (:func:`pair_weights`)."""
    return (weights.to(chosen_scores.dtype) * bradley_terry_loss(chosen_scores, rejected_scores)).sum()


def pairwise_correct(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """[B] 1 where the chosen response scores higher, 0.5 on a tie, 0 otherwise (float64).

    A tie counts half, so an untrained reward model (zero head: every score equal) reports the chance
    level 0.5 instead of 0.
    """
    chosen, rejected = chosen_scores.double(), rejected_scores.double()
    return (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
