"""The few lines only a GPU runs, each in a function named for CUDA.

Callers reach them only where a GPU is present (``engine.dist.has_gpu``, or a config that a CPU host
refuses, such as vLLM's sleep mode); everything around them runs in the CPU test suite. Colocated runs use
them to hand GPU memory between the trained roles and vLLM's sleeping engines (docs/gpu.md):

- the actor's optimizer states, fp32 master weights and gradient buffers move to host memory after
  training (DeepSpeed ``offload_states``; its FusedAdam is CUDA-only) and back before the next training;
- every colocated process returns the blocks its caching allocator keeps to the driver, so another
  process (the vLLM engine waking up) can have them.
"""
from __future__ import annotations

from typing import Any

import torch

# What the actor keeps on its GPU between trainings: its bf16 parameter partitions (the log-prob pass and
# the weight sync read them). The rest of its training state waits in host memory.
OFFLOADED_STATES = ("optim_states", "hp_params", "lp_grads", "contiguous_grad_buffer")


def cuda_memory_used_bytes() -> int:
    """Bytes in use on this process's GPU, by every process on it (what another process can still get)."""
    free, total = torch.cuda.mem_get_info()
    return total - free


def cuda_peak_allocated_bytes() -> int:
    """This process's peak tensor memory on its GPU since the last call (then reset)."""
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


def release_cuda_cache() -> None:
    """Return the blocks torch's caching allocator holds (free to this process, taken from the others)."""
    torch.cuda.empty_cache()


def offload_training_states_cuda(engine: Any) -> None:
    """Move a ZeRO-3 engine's training states (``OFFLOADED_STATES``) to pinned host memory."""
    # deepspeed: in the processes that build engines
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum

    engine.offload_states(include=[OffloadStateTypeEnum(name) for name in OFFLOADED_STATES],
                          device=OffloadDeviceEnum.cpu, pin_memory=True, non_blocking=False)


def reload_training_states_cuda(engine: Any) -> None:
    """Bring back what ``offload_training_states_cuda`` moved (a no-op when nothing was moved)."""
    engine.reload_states(non_blocking=False)
