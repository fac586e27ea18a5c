"""The reward model: one scalar score per sequence, read at its last real token."""
from __future__ import annotations

import torch

from rlhf_ds.batch import Experience
from rlhf_ds.engine import dist
from rlhf_ds.workers.base import EngineWorker
from rlhf_ds.workers.common import in_micro_batches, last_token_index, model_inputs


class RewardModelWorker(EngineWorker):
    role = "reward"

    @torch.no_grad()
    def compute_scores(self, exp: Experience) -> torch.Tensor:
        """[B] float32 scores: the value head at each sequence's last real token, on CPU."""
        device = dist.get_device()

        def one(micro: Experience) -> torch.Tensor:
            values = self.engine(**model_inputs(micro, device)).float()      # [b, P+R]
            index = last_token_index(micro).to(device)
            return values.gather(1, index.unsqueeze(1)).squeeze(1)

        return in_micro_batches(one, exp, self.micro_batch_size)
