"""Colocated GPU runs with vLLM's sleep mode: the engines and the trained roles take turns with the GPU.

Actor, reference and rollout engines share each GPU (``cluster.colocate``). One RL step hands the memory
back and forth (``rollout.vllm.enable_sleep_mode``; docs/gpu.md):

    generate (engines awake)  -> engines sleep: weights and KV cache released (``VLLMRolloutEngine.sleep``)
    log-probs, advantages     -> the actor's training states come back (DeepSpeed ``reload_states``)
    train                     -> the actor's optimizer states, master weights and gradient buffers go to
                                 host memory, every colocated process returns its cached blocks
    sync                      -> the engines wake their weights, load the new ones, wake their KV cache

The engines fall asleep when they are built, before DeepSpeed loads, so the first thing the run does is
a sync. Without sleep mode every method here is a no-op.
"""
from __future__ import annotations

from typing import Any

from rlhf_ds.config import Config


def uses_sleep_mode(cfg: Config) -> bool:
    return cfg.rollout.backend == "vllm" and cfg.rollout.vllm.enable_sleep_mode


class MemoryHandoff:
    """The trainer's side of the hand-over: which role groups to call, at which point of the step."""

    def __init__(self, cfg: Config, roles: Any):
        self.enabled = uses_sleep_mode(cfg)
        self.roles = roles

    @property
    def engines_start_asleep(self) -> bool:
        """Built asleep without weights: nothing generates before a first sync."""
        return self.enabled

    def after_rollout(self) -> dict[str, float]:
        """The step's samples are in: the engines release their memory. Returns GPU memory metrics."""
        if not self.enabled:
            return {}
        return self.roles.rollout.run_all("sleep")[0]

    def before_train(self) -> None:
        if self.enabled:
            self.roles.actor.run_all("reload_states")

    def before_sync(self) -> dict[str, float]:
        """Training is done: the actor's states go to host memory and the colocated processes return their
        cached blocks, so the engines can wake into them. Returns the actor's peak memory metric."""
        if not self.enabled:
            return {}
        metrics = self.roles.actor.run_all("offload_states")[0]
        if self.roles.reference is not None:
            self.roles.reference.run_all("release_memory")
        return metrics
