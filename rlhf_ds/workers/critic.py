"""The critic (value model): values of response states, and the clipped value-loss update.

Loss of one micro-batch: value_loss_coef * sum(clipped_value_loss * w), with the mini-batch's token
weights w, so the critic is reduced exactly like the policy (DESIGN.md).
"""
from __future__ import annotations

from typing import Any

import torch

from rlhf_ds.algo import Metric, MetricKind, value_loss
from rlhf_ds.batch import Experience
from rlhf_ds.engine import dist
from rlhf_ds.engine.step import train_minibatch
from rlhf_ds.workers.base import TrainableWorker
from rlhf_ds.workers.common import check_dp_size, in_micro_batches, require_fields, response_values


def critic_loss(model: Any, mb: Experience, algo: Any, *, device: torch.device
                ) -> tuple[torch.Tensor, dict[str, Metric]]:
    """Weighted-sum value loss of one micro-batch and its metrics."""
    values = response_values(model, mb, device)                                   # [b, R]
    old_values, returns = mb.values.to(device), mb.returns.to(device)
    weights = mb.token_weights.to(device)
    loss_sum = (value_loss(values, old_values, returns, algo.value_clip) * weights).sum()
    mask = mb.response_mask.to(device) != 0
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
        return in_micro_batches(lambda piece: response_values(self.engine, piece, device), exp,
                                self.model.micro_batch_size)

    def train_minibatch(self, exp_shard: Experience, dp_size: int) -> dict[str, Metric]:
        """One optimizer step of the critic on this rank's shard (token weights set for the mini-batch)."""
        check_dp_size(self.role, dp_size, dist.dp_size())
        require_fields(self.role, exp_shard, ("values", "returns", "token_weights"))
        algo, device = self.cfg.algo, dist.get_device()
        return train_minibatch(self.engine, exp_shard.chunk(self.model.micro_batch_size),
                               lambda mb: critic_loss(self.engine, mb, algo, device=device),
                               dp_size=dp_size, skips=self.skips, role=self.role)
