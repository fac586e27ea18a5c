"""Supervised fine-tuning of the policy: the actor worker with a cross-entropy step.

Loss of one micro-batch: ``sum(w * nll)`` over its response tokens, with the token weights w set once for
the whole mini-batch (``token_weights(mask, "token_mean")``), so the micro-batches of all ranks add up
to the mini-batch's token mean and ``sum_gradient_step`` steps with its exact gradient. The worker keeps
the actor's weight export (``weight_buckets``): the SFT stage evaluates through the rollout engines, as
RL does.

The engine is the actor's (``actor.*``: model, ranks, micro-batch, template, AdamW settings and schedule)
at the SFT learning rate ``trainer.sft.lr`` (:func:`sft_engine_config`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rlhf_ds.algo import Metric, MetricKind
from rlhf_ds.algo.supervised import sft_nll_sum
from rlhf_ds.batch import Experience
from rlhf_ds.config import Config
from rlhf_ds.engine import dist
from rlhf_ds.engine.step import sum_gradient_step
from rlhf_ds.workers.actor import ActorWorker
from rlhf_ds.workers.common import logprobs_from_logits, require_fields, response_logits


def sft_engine_config(cfg: Config) -> Config:
    """``cfg`` with the actor at ``trainer.sft.lr`` and a mini-batch of ``trainer.sft.batch_size`` rows
    (the DeepSpeed batch bookkeeping). A view for the engine builder; the run's own config is unchanged."""
    sft = cfg.trainer.sft
    return dataclasses.replace(cfg, actor=dataclasses.replace(cfg.actor, lr=sft.lr),
                               algo=dataclasses.replace(cfg.algo, mini_batch_size=sft.batch_size))


def sft_loss(model: Any, micro: Experience, *, device: torch.device) -> tuple[torch.Tensor, dict[str, Metric]]:
    """Weighted NLL sum of one micro-batch's response tokens and its metrics (SUM kinds add up to the
    mini-batch's values)."""
    logits = response_logits(model, micro, device)                            # [b, R, V]
    logprobs = logprobs_from_logits(logits, micro.response_ids.to(device))    # [b, R]
    loss = sft_nll_sum(logprobs, micro.require("token_weights").to(device))
    mask = micro.response_mask.to(device)
    with torch.no_grad():
        correct = (logits.argmax(-1) == micro.response_ids.to(device)).float() * mask
    return loss, {"loss": Metric(loss.item(), MetricKind.SUM),
                  "tokens": Metric(mask.sum().item(), MetricKind.SUM),
                  "token_accuracy_sum": Metric(correct.sum().item(), MetricKind.SUM)}


class SftWorker(ActorWorker):
    """The actor's engine trained on reference answers (``rlhf-ds sft``, the RL warm start)."""

    def __init__(self, cfg: Config):
        super().__init__(sft_engine_config(cfg))

    def train_sft_minibatch(self, shard: Experience) -> dict[str, Metric]:
        """One optimizer step on this rank's shard of an SFT mini-batch (token weights set for the whole
        mini-batch). Returns metrics combined over the data-parallel ranks."""
        require_fields("sft", shard, ("token_weights",))
        device = dist.get_device()
        return sum_gradient_step(self.engine, self.micro_batches(shard),   # packed by length
                                 lambda micro: sft_loss(self.engine, micro, device=device),
                                 skips=self.skips, role="sft")
