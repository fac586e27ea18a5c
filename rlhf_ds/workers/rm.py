"""Reward-model training: the scalar-head model of ``reward.model_path`` with an optimizer and a pairwise
(Bradley-Terry) step.

Loss of one micro-batch of pairs: ``sum(v * -log sigmoid(r_chosen - r_rejected))`` with the pair weights
v = 1 / pairs of the whole mini-batch, so the micro-batches of all ranks add up to the mini-batch mean and
``sum_gradient_step`` steps with its exact gradient. A score is read as the reward worker reads it: the
value head at each sequence's last real token. One forward scores both halves of a pair.

The reward role is an inference role of the RL run (no optimizer); here the same model trains. The
engine builder's trainable value model is the critic's slot, so the worker builds its engine from a view
of the config whose ``critic`` section is the reward model with the ``trainer.rm`` optimizer settings
(:func:`reward_model_engine_config`); nothing else of the run sees that view.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from rlhf_ds.algo import Metric, MetricKind
from rlhf_ds.algo.supervised import pairwise_correct, pairwise_loss_sum
from rlhf_ds.batch import Experience
from rlhf_ds.config import Config, TrainableRoleConfig
from rlhf_ds.data.preferences import PreferenceBatch
from rlhf_ds.engine import dist
from rlhf_ds.engine.build import build_engine
from rlhf_ds.engine.ds_config import write_ds_config
from rlhf_ds.engine.step import sum_gradient_step
from rlhf_ds.workers.base import TrainableWorker
from rlhf_ds.workers.common import last_token_index, model_inputs

ENGINE_SLOT = "critic"   # the engine builder's trainable ValueModel role


def reward_model_engine_config(cfg: Config) -> Config:
    """``cfg`` with the reward model to train in the critic's slot: its model, tokenizer, ranks and
    micro-batch (``reward.*``), its optimizer and template (``trainer.rm.*``), and a mini-batch of
    ``trainer.rm.batch_size`` pairs (the DeepSpeed batch bookkeeping). A view for the engine builder;
    the run's own config is unchanged."""
    rm, reward = cfg.trainer.rm, cfg.reward
    slot = TrainableRoleConfig(model_path=reward.model_path, tokenizer_path=reward.tokenizer_path,
                               ds_config=rm.ds_config, num_ranks=reward.num_ranks,
                               micro_batch_size=reward.micro_batch_size, lr=rm.lr, lr_schedule=rm.lr_schedule,
                               warmup_steps=rm.warmup_steps, weight_decay=rm.weight_decay)
    return dataclasses.replace(cfg, critic=slot, algo=dataclasses.replace(cfg.algo, mini_batch_size=rm.batch_size))


def sequence_scores(model: Any, exp: Experience, device: torch.device) -> torch.Tensor:
    """[B] float32 scores: the value head at each sequence's last real token (with grad)."""
    values = model(**model_inputs(exp, device)).float()          # [B, P+R]
    index = last_token_index(exp).to(device)
    return values.gather(1, index.unsqueeze(1)).squeeze(1)


def reward_model_loss(model: Any, micro: PreferenceBatch, *, device: torch.device
                      ) -> tuple[torch.Tensor, dict[str, Metric]]:
    """Weighted Bradley-Terry sum of one micro-batch of pairs and its metrics (SUM kinds weighted by the
    pair weights, so they add up to mini-batch means)."""
    if micro.pair_weights is None:
        raise ValueError("rm: the pairs carry no pair_weights; set them on the whole mini-batch first")
    weights = micro.pair_weights.to(device)
    scores = sequence_scores(model, micro.both().trimmed(), device)   # columns of padding only: cut
    chosen, rejected = scores[:len(micro)], scores[len(micro):]
    loss = pairwise_loss_sum(chosen, rejected, weights)
    with torch.no_grad():
        correct = pairwise_correct(chosen, rejected).to(weights.dtype)
        margin = chosen - rejected
    return loss, {"loss": Metric(loss.item(), MetricKind.SUM),
                  "accuracy": Metric((weights * correct).sum().item(), MetricKind.SUM),
                  "margin": Metric((weights * margin).sum().item(), MetricKind.SUM)}


class RmWorker(TrainableWorker):
    """One rank of the reward model being trained (``rlhf-ds rm``)."""
    role = ENGINE_SLOT

    def __init__(self, cfg: Config):
        super().__init__(reward_model_engine_config(cfg))

    def init_model(self, total_steps: Optional[int] = None) -> None:
        # built in the critic's slot, but the merged DeepSpeed config is saved under the reward's name
        self.role_engine = build_engine(self.cfg, self.role, total_steps=total_steps, output_dir="")
        if self.cfg.trainer.output_dir and dist.dp_rank() == 0:
            write_ds_config(self.role_engine.ds_config, self.cfg.trainer.output_dir, "reward")

    def train_pairs(self, shard: PreferenceBatch) -> dict[str, Metric]:
        """One optimizer step on this rank's shard of a mini-batch of pairs (pair weights set for the whole
        mini-batch). Returns metrics combined over the data-parallel ranks."""
        if shard.pair_weights is None:
            raise ValueError("rm: the pairs carry no pair_weights; set them on the whole mini-batch first")
        device = dist.get_device()
        return sum_gradient_step(self.engine, shard.chunk(self.micro_batch_size),
                                 lambda micro: reward_model_loss(self.engine, micro, device=device),
                                 skips=self.skips, role="rm")

    @torch.no_grad()
    def score_pairs(self, shard: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([b] chosen scores, [b] rejected scores) of this rank's pairs, on CPU. Collective under
        ZeRO-3: every rank must hold the same number of pairs."""
        device = dist.get_device()
        chosen, rejected = [], []
        for micro in shard.chunk(self.micro_batch_size):
            scores = sequence_scores(self.engine, micro.both().trimmed(), device).cpu()
            chosen.append(scores[:len(micro)])
            rejected.append(scores[len(micro):])
        return torch.cat(chosen), torch.cat(rejected)
