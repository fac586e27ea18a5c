"""The actor (policy): log-probs / entropy of responses, and the policy-gradient update.

Loss of one micro-batch, every term a weighted sum with the mini-batch's token weights (so the sum over
micro-batches and ranks is the chosen reduction of the whole mini-batch, docs/design.md#one-set-of-token-weights-for-every-term):

    sum(policy_loss(A * w) * mask) + kl_coef * sum(kl * w) - entropy_coef * sum(entropy * w)

with raw advantages A and the mini-batch's token weights w (``algo.token_weights``). Peers reduce KL
and entropy as per-micro-batch means; here they share the policy term's weights.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from rlhf_ds.algo import (
    POLICY_STAT_KINDS,
    Metric,
    MetricKind,
    entropy_from_logits,
    kl_penalty,
    metrics_from_stats,
    policy_loss,
    truncated_is_weights,
    weighted_advantages,
)
from rlhf_ds.batch import Experience
from rlhf_ds.engine import dist
from rlhf_ds.engine.gather import full_shapes, iter_full_param_buckets
from rlhf_ds.engine.step import sum_gradient_step
from rlhf_ds.rollout.precision import rollout_torch_dtype
from rlhf_ds.rollout.weights import ParamSpec, dtype_name
from rlhf_ds.workers.base import TrainableWorker
from rlhf_ds.workers.common import logprobs_from_logits, policy_logprobs, require_fields, response_logits


def actor_loss(model: Any, micro: Experience, algo: Any, *, kl_coef: float, temperature: float,
               device: torch.device) -> tuple[torch.Tensor, dict[str, Metric]]:
    """Weighted-sum loss of one micro-batch and its metrics (SUM kinds add up to the mini-batch values).

    The policy term takes the advantages weighted by the mini-batch's token weights (pre-scaling, exact
    for losses homogeneous in the advantage); KL and entropy are weighted by the same weights.
    """
    logits = response_logits(model, micro, device, temperature)              # [b, R, V]
    logprobs = logprobs_from_logits(logits, micro.response_ids.to(device))   # [b, R]
    mask = micro.response_mask.to(device)
    weights = micro.require("token_weights").to(device)
    metrics: dict[str, Metric] = {}
    if micro.old_logprobs is None:   # an on-policy update (Config.on_policy_update): this forward's values
        old_logprobs = logprobs.detach()
        metrics.update(rollout_gap_metrics(old_logprobs, micro.rollout_logprobs, mask))
    else:
        old_logprobs = micro.old_logprobs.to(device)
    is_weights = None
    if algo.tis and micro.rollout_logprobs is not None:
        is_weights = truncated_is_weights(old_logprobs, micro.rollout_logprobs.to(device), algo.tis_cap, mask)
    advantages = weighted_advantages(micro.require("advantages").to(device), weights)
    loss_tok, stats = policy_loss(algo.policy_loss, logprobs, old_logprobs, advantages, mask,
                                  clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip,
                                  is_weights=is_weights)
    pg_loss = (loss_tok * mask).sum()
    total = pg_loss
    metrics.update({"policy_loss": Metric(pg_loss.item(), MetricKind.SUM),
                    **metrics_from_stats(stats, POLICY_STAT_KINDS)})
    if algo.kl_placement == "loss" and kl_coef > 0:
        kl_sum = (kl_penalty(logprobs, micro.require("ref_logprobs").to(device), algo.kl_estimator) * weights).sum()
        total = total + kl_coef * kl_sum
        metrics["kl_loss"] = Metric(kl_sum.item(), MetricKind.SUM)
    if algo.entropy_coef != 0:
        entropy_sum = (entropy_from_logits(logits) * weights).sum()
        total = total - algo.entropy_coef * entropy_sum
    else:   # reported even without the bonus (no graph kept)
        with torch.no_grad():
            entropy_sum = (entropy_from_logits(logits.detach()) * weights).sum()
    metrics["entropy"] = Metric(entropy_sum.item(), MetricKind.SUM)
    metrics["loss"] = Metric(total.item(), MetricKind.SUM)
    return total, metrics


def rollout_gap_metrics(logprobs: torch.Tensor, rollout_logprobs: Optional[torch.Tensor], mask: torch.Tensor
                        ) -> dict[str, Metric]:
    """|actor - engine| log-prob gap of a micro-batch as sums (the trainer divides by the token count)."""
    if rollout_logprobs is None:
        return {}
    gap = (logprobs - rollout_logprobs.to(logprobs.device)).abs() * mask
    return {"rollout_gap_sum": Metric(gap.sum().item(), MetricKind.SUM),
            "rollout_gap_max": Metric(gap.max().item() if gap.numel() else 0.0, MetricKind.MAX),
            "rollout_gap_tokens": Metric(mask.sum().item(), MetricKind.SUM)}


class ActorWorker(TrainableWorker):
    role = "actor"

    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        """[B, R] log-probs of the response tokens at the rollout temperature, on CPU."""
        return policy_logprobs(self.engine, exp, self.micro_batch_size, self.cfg.rollout.temperature,
                               dist.get_device())

    def train_minibatch(self, shard: Experience, kl_coef: Optional[float] = None) -> dict[str, Metric]:
        """One optimizer step on this rank's shard of a mini-batch (raw advantages, token weights set
        for the whole mini-batch). kl_coef: this step's coefficient (adaptive KL); default
        ``algo.kl_coef``. Returns metrics combined over the data-parallel ranks."""
        algo = self.cfg.algo
        kl_coef = float(algo.kl_coef) if kl_coef is None else kl_coef
        needed = ("advantages", "token_weights") + (() if self.cfg.on_policy_update else ("old_logprobs",))
        if algo.kl_placement == "loss" and kl_coef > 0:
            needed += ("ref_logprobs",)
        require_fields(self.role, shard, needed)
        device = dist.get_device()

        def loss_fn(micro: Experience):
            return actor_loss(self.engine, micro, algo, kl_coef=kl_coef, temperature=self.cfg.rollout.temperature,
                              device=device)

        return sum_gradient_step(self.engine, self.micro_batches(shard), loss_fn, skips=self.skips,
                                 role=self.role)

    def weight_manifest(self) -> list[ParamSpec]:
        """Name, dtype and full shape of every tensor ``weight_buckets`` yields, in order (no gather)."""
        dtype = dtype_name(self._rollout_dtype())
        return [ParamSpec(name, dtype, shape) for name, shape in full_shapes(self.built.module)]

    def weight_buckets(self, bucket_bytes: Optional[int] = None, on_device: bool = False
                       ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full parameters as lists of (HF name, tensor in the rollout engines' dtype) of at most
        ``bucket_bytes`` (None: one list per module), gathered one list at a time; CPU copies unless
        ``on_device`` (NCCL / IPC transfers send device tensors). Collective: every rank walks it to the end."""
        return iter_full_param_buckets(self.built.module, bucket_bytes=bucket_bytes, to_cpu=not on_device,
                                       dtype=self._rollout_dtype())

    def _rollout_dtype(self) -> torch.dtype:
        return rollout_torch_dtype(self.cfg)
