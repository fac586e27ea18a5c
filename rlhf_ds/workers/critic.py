"""The critic (value model): values of response states, and the clipped value-loss update.

Loss of one micro-batch: value_loss_coef * sum(clipped_value_loss * w), with the mini-batch's token
weights w, so the critic is reduced exactly like the policy (docs/design.md#one-set-of-token-weights-for-every-term).
"""
from __future__ import annotations

from typing import Any

import torch

from rlhf_ds.algo import Metric, MetricKind, value_loss
from rlhf_ds.batch import Experience
from rlhf_ds.engine import dist
from rlhf_ds.engine.step import sum_gradient_step
from rlhf_ds.workers.base import TrainableWorker
from rlhf_ds.workers.common import in_micro_batches, require_fields, response_values


def critic_loss(model: Any, micro: Experience, algo: Any, *, device: torch.device
                ) -> tuple[torch.Tensor, dict[str, Metric]]:
    """Weighted-sum value loss of one micro-batch and its metrics."""
    values = response_values(model, micro, device)                                   # [b, R]
    old_values, returns = micro.require("values").to(device), micro.require("returns").to(device)
    weights = micro.require("token_weights").to(device)
    loss_sum = (value_loss(values, old_values, returns, algo.value_clip) * weights).sum()
    mask = micro.response_mask.to(device) != 0
    with torch.no_grad():
        clipped = ((values - old_values).abs() > algo.value_clip) & mask if algo.value_clip > 0 else torch.zeros_like(mask)
        clip_frac = clipped.float().sum() / mask.sum().clamp(min=1)
    metrics = {"value_loss": Metric(loss_sum.item(), MetricKind.SUM),
               "value_clip_frac": Metric(clip_frac.item(), MetricKind.MEAN)}
    return algo.value_loss_coef * loss_sum, metrics


class CriticWorker(TrainableWorker):
    role = "critic"

    @torch.no_grad()
    def compute_values(self, exp: Experience) -> torch.Tensor:
        """[B, R] values of the states before each response token, on CPU."""
        device = dist.get_device()
        return in_micro_batches(lambda micro: response_values(self.engine, micro, device), exp,
                                self.micro_batch_size)

    def train_minibatch(self, shard: Experience) -> dict[str, Metric]:
        """One optimizer step of the critic on this rank's shard (token weights set for the mini-batch).
        Returns metrics combined over the data-parallel ranks."""
        require_fields(self.role, shard, ("values", "returns", "token_weights"))
        algo, device = self.cfg.algo, dist.get_device()
        return sum_gradient_step(self.engine, self.micro_batches(shard),
                                 lambda micro: critic_loss(self.engine, micro, algo, device=device),
                                 skips=self.skips, role=self.role)
