"""Code that runs inside vLLM's worker processes: the shared-memory weight-transfer backend for CPU hosts.

vLLM imports this module in every worker (``worker_extension_cls``), which registers the backend before
the worker builds its transfer engine. vLLM's own NCCL and IPC backends need a GPU; on CPU the engine's
host process writes each update as safetensors files in ``/dev/shm`` and this backend loads them through
vLLM's layerwise reload, the path that restores the checkpoint layout, loads and repacks (plain
``model.load_weights`` after start-up silently breaks vLLM's repacked CPU linear layers, vllm.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from rlhf_ds.rollout.vllm_settings import SHM_BACKEND


@dataclass
class ShmInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: the files carry everything."""


@dataclass
class ShmUpdateInfo(WeightTransferUpdateInfo):
    paths: list[str] = field(default_factory=list)   # safetensors files, loaded in this order


class ShmWeightTransferEngine(WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
    """Loads safetensors files (HF names, checkpoint layout) with vLLM's layerwise reload."""

    init_info_cls = ShmInitInfo
    update_info_cls = ShmUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronizes an accelerator, which a CPU host does not have.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: ShmUpdateInfo) -> None:
        from safetensors.torch import load_file

        for path in update_info.paths:
            self.model.load_weights(iter(load_file(path).items()))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass


if SHM_BACKEND not in WeightTransferEngineFactory._registry:
    WeightTransferEngineFactory.register_engine(SHM_BACKEND, ShmWeightTransferEngine)


class RolloutWorkerExtension:
    """Mixed into vLLM's worker class; importing this module registered the CPU backend above."""

    def loaded_parameter_count(self) -> int:
        """Elements in the worker's model (a cheap liveness check through ``collective_rpc``)."""
        return sum(p.numel() for p in self.model_runner.model.parameters())  # type: ignore[attr-defined]

