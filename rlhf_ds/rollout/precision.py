"""The precision rollout engines generate in: the trained roles' (``precision``; auto = bf16 on a GPU)."""
from __future__ import annotations

import torch

from rlhf_ds.config import Config
from rlhf_ds.engine.dist import has_gpu
from rlhf_ds.engine.ds_config import resolve_precision


def rollout_dtype(cfg: Config) -> str:
    """"fp32" or "bf16": the engines' precision, the trained roles' own."""
    return resolve_precision(cfg.precision, has_gpu())


def rollout_torch_dtype(cfg: Config) -> torch.dtype:
    """``rollout_dtype`` as a torch dtype (what the actor casts weights to before a sync)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[rollout_dtype(cfg)]
