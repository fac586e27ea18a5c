"""Which rollout engine a run uses, and how to build one (``rollout.backend``).

The cluster layer builds one engine per rank of the rollout group from the spec returned here; each
engine implements :class:`rlhf_ds.rollout.base.RolloutEngine`.
"""
from __future__ import annotations

from rlhf_ds.config import Config
from rlhf_ds.engine.dist import has_gpu
from rlhf_ds.rollout.base import RolloutEngine
from rlhf_ds.rollout.precision import rollout_dtype


def rollout_engine_spec(cfg: Config) -> tuple[type[RolloutEngine], tuple]:
    """(engine class, constructor arguments) for ``cfg.rollout.backend``."""
    if cfg.rollout.backend == "vllm":
        return _vllm_spec(cfg)
    # transformers: loaded when first needed
    from rlhf_ds.rollout.hf_engine import MAX_BATCH_SEQUENCES, HFRolloutEngine

    return HFRolloutEngine, (cfg.actor.model_path, rollout_dtype(cfg), MAX_BATCH_SEQUENCES, cfg.actor.tokenizer_path,
                            cfg.rollout.hf_decoder)


def _vllm_spec(cfg: Config) -> tuple[type[RolloutEngine], tuple]:
    # transformers: loaded when first needed
    from rlhf_ds.rollout.vllm_engine import VLLMRolloutEngine

    spmd = cfg.cluster.launcher == "deepspeed"
    if spmd and not has_gpu():
        raise ValueError("rollout.backend='vllm' with cluster.launcher='deepspeed' runs one vLLM engine per rank "
                         "with vLLM's external_launcher executor, which needs a GPU; on this CPU host use "
                         "cluster.launcher=ray (engines as Ray actors) or rollout.backend=hf")
    return VLLMRolloutEngine, (cfg, spmd)
