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


def rollout_torch_dtype(cfg: Config):
    """``rollout_dtype`` as a torch dtype (what the actor casts weights to before a sync)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[rollout_dtype(cfg)]


def rollout_engine_spec(cfg: Config) -> tuple[type[RolloutEngine], tuple]:
    """(engine class, constructor arguments) for ``cfg.rollout.backend``."""
    if cfg.rollout.backend == "vllm":
        return _vllm_spec(cfg)
    from rlhf_ds.rollout.hf_engine import MAX_BATCH_SEQUENCES, HFRolloutEngine

    return HFRolloutEngine, (cfg.actor.model_path, rollout_dtype(cfg), MAX_BATCH_SEQUENCES, cfg.actor.tokenizer_path,
                            cfg.rollout.hf_decoder)


def _vllm_spec(cfg: Config) -> tuple[type[RolloutEngine], tuple]:
    from rlhf_ds.engine.dist import has_gpu
    from rlhf_ds.rollout.vllm_engine import VLLMRolloutEngine

    spmd = cfg.cluster.launcher == "deepspeed"
    if spmd and not has_gpu():
        raise ValueError("rollout.backend='vllm' with cluster.launcher='deepspeed' runs one vLLM engine per rank "
                         "with vLLM's external_launcher executor, which needs a GPU; on this CPU host use "
                         "cluster.launcher=ray (engines as Ray actors) or rollout.backend=hf")
    return VLLMRolloutEngine, (cfg, spmd)
