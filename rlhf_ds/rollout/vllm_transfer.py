"""The actor's half of vLLM's weight transfer: NCCL broadcast to engines on other GPUs, CUDA IPC to engines
colocated with the actor, and the same NCCL protocol over gloo on CPU hosts (``rollout.vllm_gloo``).

vLLM's trainer-side engines (``WeightTransferTrainerFactory``) do the wire work; this module gives them
what is ours: a ``WeightSource`` over the ZeRO-3 gather (every actor rank iterates it, rank 0 sends),
the init info of each backend, and the per-engine rendezvous ranks. The control plane (a client with
``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``)
is the cluster layer's, since it calls the engines wherever they live.

Protocol, per sync (``cluster`` drives it): the engines check the manifest first
(``start_weight_update(manifest, version)``, ``rollout.weights``); then every actor rank calls
``send_weights``: rank 0 tells the engines to start, broadcasts (or ships IPC handles of) each packed
buffer of at most ``rollout.weight_sync_bucket_mb`` while the engines receive and load it, and tells them
to finish; the other ranks only take part in the gathers (and, for IPC, in the handle exchange: each
colocated engine reads the buffer of the actor rank on its own GPU).

Memory: both packed senders hold at most the buffers of ``bucket_bytes`` beside the gathered bucket.
vLLM's unpacked IPC sender would instead keep every gathered tensor alive until the update finishes, a
whole copy of the model on each actor GPU, whatever the bucket size.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

from rlhf_ds.rollout.vllm_gloo import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine
from rlhf_ds.rollout.vllm_settings import GLOO_BACKEND

# the transfers vLLM drives from actor rank 0 (the shared-memory backend is loaded by the engine itself)
DIRECT_BACKENDS = ("nccl", "ipc", GLOO_BACKEND)

# vLLM's packed broadcast double-buffers: two buffers in flight
_PACKED_BUFFERS = 2

if GLOO_BACKEND not in WeightTransferTrainerFactory._registry:
    WeightTransferTrainerFactory.register_engine(GLOO_BACKEND, GlooTrainerWeightTransferEngine)


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
                      world_size: int = 0, bucket_bytes: int = 64 << 20) -> Any:
    """vLLM's trainer-side init info. NCCL (and gloo) need the rendezvous: actor rank 0 is rank 0 of the
    transfer group, the engine workers follow. Every backend sends packed buffers of ``bucket_bytes``."""
    if backend in ("nccl", GLOO_BACKEND):
        info_cls = GlooTrainerInitInfo if backend == GLOO_BACKEND else NCCLTrainerInitInfo
        return info_cls(master_address=master_address, master_port=master_port, world_size=world_size, packed=True,
                        packed_buffer_size_bytes=bucket_bytes, packed_num_buffers=_PACKED_BUFFERS, rank=rank)
    if backend == "ipc":
        return IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=bucket_bytes, rank=rank)
    raise ValueError(f"no weight transfer driven by the actor is named {backend!r}; valid: "
                     f"{', '.join(DIRECT_BACKENDS)}")


def nccl_world_size(num_engines: int, tensor_parallel_size: int) -> int:
    """Actor rank 0 plus every engine worker (NCCL and gloo)."""
    return 1 + num_engines * tensor_parallel_size


def engine_init_info(init_info: dict, engine_index: int, tensor_parallel_size: int) -> dict:
    """The worker init info for engine ``engine_index``: vLLM's trainer addresses its engine workers from
    rank 1 on, as if there were one engine; with several, engine i's workers sit at 1 + i * tp."""
    if "rank_offset" not in init_info:   # IPC: no ranks to place
        return dict(init_info)
    return dict(init_info, rank_offset=1 + engine_index * tensor_parallel_size)


def packed_buffer_bytes(backend: str, bucket_bytes: int, manifest: list) -> int:
    """The packed buffer of one transfer: the bucket, or for IPC at least the largest tensor (vLLM's IPC
    producer copies each tensor whole into its one shared buffer and refuses a larger one; a vocabulary of
    150k rows is a few hundred MB)."""
    if backend != "ipc" or not manifest:
        return bucket_bytes
    largest = max(int(torch.Size(spec.shape).numel()) * getattr(torch, spec.dtype).itemsize for spec in manifest)
    return max(bucket_bytes, largest)


def open_transfer(backend: str, client: Any, actor_worker: Any, rank: int, bucket_bytes: int, **rendezvous) -> Any:
    """vLLM's trainer engine for ``backend`` on this actor rank, connected to the engines (NCCL and gloo:
    the rendezvous happens here, on rank 0 and the engine workers together). ``send_weights()`` syncs
    once; every actor rank calls it."""
    buffer_bytes = packed_buffer_bytes(backend, bucket_bytes, actor_worker.weight_manifest())
    info = trainer_init_info(backend, rank, bucket_bytes=buffer_bytes, **rendezvous)
    return WeightTransferTrainerFactory.trainer_init(info, client=client,
                                                     source=ZeroWeightSource(actor_worker, bucket_bytes))
