"""Which rollout engine a run uses, and how to build one (``rollout.backend``).

The cluster layer builds one engine per rank of the rollout group from the spec returned here; each
engine implements :class:`rlhf_ds.rollout.base.RolloutEngine`.
"""
from __future__ import annotations

from rlhf_ds.config import Config
from rlhf_ds.rollout.base import RolloutEngine


def rollout_dtype(cfg: Config) -> str:
    """The precision the engines generate in: the trained roles' (``precision``, auto = bf16 on GPU)."""
    from rlhf_ds.engine.dist import has_gpu
    from rlhf_ds.engine.ds_config import resolve_precision

    return resolve_precision(cfg.precision, has_gpu())


def rollout_engine_spec(cfg: Config) -> tuple[type[RolloutEngine], tuple]:
    """(engine class, constructor arguments) for ``cfg.rollout.backend``."""
    if cfg.rollout.backend != "hf":
        raise ValueError(f"rollout.backend={cfg.rollout.backend!r} has no engine in this release; valid: 'hf'")
    from rlhf_ds.rollout.hf_engine import HFRolloutEngine

    return HFRolloutEngine, (cfg.actor.model_path, rollout_dtype(cfg))
