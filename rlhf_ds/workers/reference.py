"""The reference policy: frozen log-probs of the responses for the KL term."""
from __future__ import annotations

import torch

from rlhf_ds.batch import Experience
from rlhf_ds.engine import dist
from rlhf_ds.workers.base import EngineWorker
from rlhf_ds.workers.common import policy_logprobs


class ReferenceWorker(EngineWorker):
    role = "reference"

    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        """[B, R] reference log-probs (same temperature as the actor's), on CPU."""
        return policy_logprobs(self.engine, exp, self.micro_batch_size, self.cfg.rollout.temperature,
                               dist.get_device())
