"""The reference policy: frozen log-probs of the responses for the KL term."""
from __future__ import annotations

import torch

from rlhf_ds.batch import Experience
from rlhf_ds.engine import dist
from rlhf_ds.workers.base import EngineWorker
from rlhf_ds.workers.common import in_micro_batches, logprobs_from_logits, response_logits


class ReferenceWorker(EngineWorker):
    role = "reference"

    @torch.no_grad()
    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        """[B, R] reference log-probs (same temperature as the actor's), on CPU."""
        device, temperature = dist.get_device(), self.cfg.rollout.temperature

        def one(piece: Experience) -> torch.Tensor:
            logits = response_logits(self.model.engine, piece, device, temperature)
            return logprobs_from_logits(logits, piece.response_ids.to(device))

        return in_micro_batches(one, exp, self.model.micro_batch_size)
