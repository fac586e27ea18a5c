"""Code that runs inside vLLM's worker processes: the weight-transfer backends of CPU hosts and of
engines living in an actor rank's own process.

vLLM imports this module in every worker (``worker_extension_cls``), which registers the backends before
the worker builds its transfer engine:

- ``rlhf_ds_gloo``: vLLM's NCCL receive over gloo (``rollout.vllm_gloo``), for engines of their own on CPU;
- ``rlhf_ds_shm``: the engine's host process writes each update as safetensors files in ``/dev/shm`` and
  this backend loads them, for an engine in the same process as its actor rank (the deepspeed launcher).

Both load through vLLM's layerwise reload, the path that restores the checkpoint layout, loads and repacks
(plain ``model.load_weights`` after start-up silently breaks vLLM's repacked CPU linear layers,
docs/rollouts.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from rlhf_ds.rollout.vllm_gloo import GlooWeightTransferEngine
from rlhf_ds.rollout.vllm_settings import GLOO_BACKEND, SHM_BACKEND


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
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronizes an accelerator, which a CPU host does not have.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: ShmUpdateInfo) -> None:
        from safetensors.torch import load_file  # safetensors: only on the weight-update path

        for path in update_info.paths:
            # vLLM's models define load_weights; torch.nn.Module, the declared type, does not
            self.model.load_weights(iter(load_file(path).items()))  # pyright: ignore[reportCallIssue]

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass


for _name, _engine in ((SHM_BACKEND, ShmWeightTransferEngine), (GLOO_BACKEND, GlooWeightTransferEngine)):
    if _name not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(_name, _engine)


class RolloutWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``). It adds no methods: naming it makes vLLM
    import this module in every worker, which registers the backends above before the worker builds its
    transfer engine."""
