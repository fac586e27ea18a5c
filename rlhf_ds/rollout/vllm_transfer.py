"""The actor's half of vLLM's GPU weight transfer: NCCL broadcast to engines on other GPUs, CUDA IPC to
engines colocated with the actor.

vLLM's trainer-side engines (``WeightTransferTrainerFactory``) do the wire work; this module gives them
what is ours: a ``WeightSource`` over the ZeRO-3 gather (every actor rank iterates it, rank 0 sends),
the init info of each backend, and the per-engine rendezvous ranks. The control plane (a client with
``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``)
is the cluster layer's, since it calls the engines wherever they live.

Protocol, per sync (``cluster`` drives it): the engines check the manifest first
(``start_weight_update(manifest, version)``, ``rollout.weights``); then every actor rank calls
``send_weights``: rank 0 tells the engines to start, broadcasts (or ships IPC handles of) each gathered
bucket while the engines receive and load it, and tells them to finish; the other ranks only take part
in the gathers.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

GPU_BACKENDS = ("nccl", "ipc")


class ZeroWeightSource(WeightSource):
    """The actor's full parameters, gathered from ZeRO-3 in size-bounded buckets, in the engines' dtype.

    ``metadata()`` is the actor's manifest (no gather); iteration gathers bucket by bucket on every rank
    (a collective) and yields device tensors, in the manifest's order."""

    def __init__(self, actor_worker: Any, bucket_bytes: int):
        self.actor_worker, self.bucket_bytes = actor_worker, bucket_bytes
        self._meta: Optional[list[ParamMeta]] = None

    def metadata(self) -> list[ParamMeta]:
        if self._meta is None:
            self._meta = [ParamMeta(spec.name, getattr(torch, spec.dtype), tuple(spec.shape))
                          for spec in self.actor_worker.weight_manifest()]
        return self._meta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.actor_worker.weight_buckets(self.bucket_bytes, on_device=True):
            yield from bucket


def trainer_init_info(backend: str, rank: int, *, master_address: str = "", master_port: int = 0,
                      world_size: int = 0, bucket_bytes: int = 0) -> Any:
    """vLLM's trainer-side init info: NCCL needs the rendezvous (actor rank 0 is NCCL rank 0, the engine
    workers follow) and sends packed buffers of ``bucket_bytes``; IPC needs nothing more."""
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size,
                                   packed=True, packed_buffer_size_bytes=bucket_bytes, rank=rank)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=rank)
    raise ValueError(f"no GPU weight transfer named {backend!r}; valid: {', '.join(GPU_BACKENDS)}")


def nccl_world_size(num_engines: int, tensor_parallel_size: int) -> int:
    """Actor rank 0 plus every engine worker."""
    return 1 + num_engines * tensor_parallel_size


def engine_init_info(init_info: dict, engine_index: int, tensor_parallel_size: int) -> dict:
    """The worker init info for engine ``engine_index``: vLLM's trainer addresses its engine workers from
    NCCL rank 1 on, as if there were one engine; with several, engine i's workers sit at 1 + i * tp."""
    if "rank_offset" not in init_info:   # IPC: no ranks to place
        return dict(init_info)
    return dict(init_info, rank_offset=1 + engine_index * tensor_parallel_size)


def open_transfer(backend: str, client: Any, actor_worker: Any, rank: int, bucket_bytes: int, **rendezvous) -> Any:
    """vLLM's trainer engine for ``backend`` on this actor rank, connected to the engines (NCCL: the
    rendezvous happens here, on rank 0 and the engine workers together). ``send_weights()`` syncs once."""
    info = trainer_init_info(backend, rank, bucket_bytes=bucket_bytes, **rendezvous)
    return WeightTransferTrainerFactory.trainer_init(info, client=client,
                                                     source=ZeroWeightSource(actor_worker, bucket_bytes))

