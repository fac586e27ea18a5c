"""The actor (policy): log-probs / entropy of responses, and the policy-gradient update.

Loss of one micro-batch, every term a weighted sum with the mini-batch's token weights (so the sum over
micro-batches and ranks is the chosen reduction of the whole mini-batch, DESIGN.md):

    sum(policy_loss(scaled advantages) * mask) + kl_coef * sum(kl * w) - entropy_coef * sum(entropy * w)

Peers reduce KL and entropy as per-micro-batch means; here they share the policy term's weights.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from rlhf_ds.algo import (POLICY_STAT_KINDS, Metric, MetricKind, entropy_from_logits, kl_penalty,
                          metrics_from_stats, policy_loss, truncated_is_weights)
from rlhf_ds.batch import Experience
from rlhf_ds.engine import dist
from rlhf_ds.engine.gather import iter_full_params
from rlhf_ds.engine.step import train_minibatch
from rlhf_ds.workers.base import TrainableWorker
from rlhf_ds.workers.common import (check_dp_size, in_micro_batches, logprobs_from_logits, require_fields,
                                    response_logits)


def actor_loss(model: Any, mb: Experience, algo: Any, *, kl_coef: float, temperature: float,
               device: torch.device) -> tuple[torch.Tensor, dict[str, Metric]]:
    """Masked-sum loss of one micro-batch and its metrics (SUM kinds add up to the mini-batch values)."""
    logits = response_logits(model, mb, device, temperature)              # [b, R, V]
    logprobs = logprobs_from_logits(logits, mb.response_ids.to(device))   # [b, R]
    mask = mb.response_mask.to(device)
    is_weights = None
    if algo.tis and mb.rollout_logprobs is not None:
        is_weights = truncated_is_weights(mb.old_logprobs.to(device), mb.rollout_logprobs.to(device),
                                          algo.tis_cap, mask)
    loss_tok, stats = policy_loss(algo.policy_loss, logprobs, mb.old_logprobs.to(device),
                                  mb.advantages.to(device), mask, clip_low=algo.clip_low,
                                  clip_high=algo.clip_high, dual_clip=algo.dual_clip, is_weights=is_weights)
    pg_loss = (loss_tok * mask).sum()
    total = pg_loss
    metrics = {"policy_loss": Metric(pg_loss.item(), MetricKind.SUM),
               **metrics_from_stats(stats, POLICY_STAT_KINDS)}
    if algo.kl_placement == "loss" and kl_coef > 0:
        weights = mb.token_weights.to(device)
        kl_sum = (kl_penalty(logprobs, mb.ref_logprobs.to(device), algo.kl_estimator) * weights).sum()
        total = total + kl_coef * kl_sum
        metrics["kl_loss"] = Metric(kl_sum.item(), MetricKind.SUM)
    if algo.entropy_coef != 0:
        weights = mb.token_weights.to(device)
        entropy_sum = (entropy_from_logits(logits) * weights).sum()
        total = total - algo.entropy_coef * entropy_sum
        metrics["entropy"] = Metric(entropy_sum.item(), MetricKind.SUM)
    elif mb.token_weights is not None:   # reported even without the bonus (no graph kept)
        with torch.no_grad():
            entropy_sum = (entropy_from_logits(logits.detach()) * mb.token_weights.to(device)).sum()
        metrics["entropy"] = Metric(entropy_sum.item(), MetricKind.SUM)
    metrics["loss"] = Metric(total.item(), MetricKind.SUM)
    return total, metrics


class ActorWorker(TrainableWorker):
    role = "actor"

    @torch.no_grad()
    def compute_logprobs(self, exp: Experience, with_entropy: bool = False):
        """[B, R] log-probs of the response tokens (and [B, R] entropies when asked), on CPU."""
        device, temperature = dist.get_device(), self.cfg.rollout.temperature

        def one(piece: Experience) -> torch.Tensor:
            logits = response_logits(self.engine, piece, device, temperature)
            logprobs = logprobs_from_logits(logits, piece.response_ids.to(device))
            if not with_entropy:
                return logprobs
            return torch.stack([logprobs, entropy_from_logits(logits)], dim=0).transpose(0, 1)

        out = in_micro_batches(one, exp, self.model.micro_batch_size)
        return (out[:, 0], out[:, 1]) if with_entropy else out

    def train_minibatch(self, exp_shard: Experience, dp_size: int, kl_coef: Optional[float] = None
                        ) -> dict[str, Metric]:
        """One optimizer step on this rank's shard of a mini-batch (advantages already pre-scaled and
        token weights set for the whole mini-batch). kl_coef: this step's coefficient (adaptive KL);
        default ``algo.kl_coef``. Returns metrics combined over the data-parallel ranks."""
        algo = self.cfg.algo
        check_dp_size(self.role, dp_size, dist.dp_size())
        kl_coef = algo.kl_coef if kl_coef is None else kl_coef
        needed = ("old_logprobs", "advantages")
        if algo.kl_placement == "loss" and kl_coef > 0:
            needed += ("ref_logprobs", "token_weights")
        if algo.entropy_coef != 0:
            needed += ("token_weights",)
        require_fields(self.role, exp_shard, needed)
        device = dist.get_device()

        def loss_fn(mb: Experience):
            return actor_loss(self.engine, mb, algo, kl_coef=kl_coef, temperature=self.cfg.rollout.temperature,
                              device=device)

        return train_minibatch(self.engine, exp_shard.chunk(self.model.micro_batch_size), loss_fn,
                               dp_size=dp_size, skips=self.skips, role=self.role)

    def weights(self, bucket_bytes: Optional[int] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full parameters as (HF name, CPU tensor), gathered per module or in buckets (collective)."""
        return iter_full_params(self.model.module, bucket_bytes=bucket_bytes)
