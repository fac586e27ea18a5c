"""vLLM's NCCL weight transfer with gloo under it: the GPU protocol, run on CPU hosts.

On GPUs the actor's rank 0 broadcasts packed buffers of its gathered parameters to the engine workers
through vLLM's NCCL engines (``vllm.distributed.weight_transfer.nccl_engine``). Everything in that path but
the NCCL communicator and the CUDA streams runs as well on a CPU: the trainer engine's handshake, the
packing of buckets into buffers, the worker's unpacking and its layerwise reload, the rank of each engine
worker in the transfer group. This module keeps all of it and swaps only those two pieces:

- :class:`GlooCommunicator` broadcasts over a gloo group of its own (a TCP store on actor rank 0's node,
  as vLLM's stateless NCCL group has), with the call the packed broadcast makes of NCCL;
- :func:`host_streams` stands in for the CUDA streams vLLM's packed broadcast double-buffers on (a
  gloo broadcast is synchronous: one stand-in stream, always synchronized).

So CPU runs of engines of their own (``rollout.backend=vllm`` under Ray) sync exactly as GPU runs do, and
the test suite executes the GPU path up to the communicator.
"""
from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional

import torch
import torch.distributed as torch_dist
from vllm.distributed.weight_transfer import packed_tensor
from vllm.distributed.weight_transfer.base import VLLMWeightSyncClient, WeightSource
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
    NCCLWeightTransferEngine,
)

from rlhf_ds.rollout.vllm_settings import GLOO_BACKEND

# A rank that waits this long in the rendezvous or a broadcast has lost its peers (a dead engine).
TIMEOUT_S = 600.0


class GlooCommunicator:
    """A broadcast group over gloo for the actor's rank 0 (rank 0, the store's host) and the engine workers:
    what vLLM's packed broadcast asks of its NCCL communicator."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float = TIMEOUT_S):
        timeout = datetime.timedelta(seconds=timeout_s)
        # torch.distributed's store and gloo classes come from its C extension, unlisted in its exports
        store = torch_dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
            master_address, master_port, world_size, rank == 0, timeout=timeout)
        self.rank, self.world_size = rank, world_size
        self.group: Optional[torch_dist.ProcessGroupGloo] = torch_dist.ProcessGroupGloo(
            torch_dist.PrefixStore("rlhf_ds_weights", store),  # pyright: ignore[reportPrivateImportUsage]
            rank, world_size, timeout)
        self._store = store   # the store's server lives as long as the group on rank 0

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> None:
        if self.group is None:
            raise RuntimeError("the weight-transfer group was destroyed")
        opts = torch_dist.BroadcastOptions()
        opts.rootRank = src
        self.group.broadcast([tensor], opts).wait()  # pyright: ignore[reportAttributeAccessIssue]  # no stub for the C++ method

    def destroy(self) -> None:
        self.group = None


class _HostStream:
    """A CUDA stream's role in the packed broadcast, on a host: the work it would wait for is done."""

    def synchronize(self) -> None:
        pass


@contextmanager
def host_streams() -> Iterator[None]:
    """vLLM's packed broadcast asks for the current CUDA device and its streams; on a CPU host it gets
    stand-ins (gloo's broadcast returns once the bytes are in place, so there is nothing to overlap)."""
    if torch.cuda.is_available():   # a GPU host has real streams
        yield
        return
    saved = packed_tensor._get_streams, torch.accelerator.current_device_index
    packed_tensor._get_streams = lambda _device, num_buffers: (_HostStream(),) * num_buffers
    torch.accelerator.current_device_index = lambda: 0
    try:
        yield
    finally:
        packed_tensor._get_streams, torch.accelerator.current_device_index = saved


@dataclass
class GlooTrainerInitInfo(NCCLTrainerInitInfo):
    """The NCCL trainer's init info (rendezvous, packed buffers), for the gloo communicator."""
    backend: ClassVar[str] = GLOO_BACKEND


class GlooTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """vLLM's NCCL trainer engine (handshake, packed broadcast, metadata checks) over gloo."""

    init_info_cls = GlooTrainerInitInfo   # the NCCL info under this backend's key

    @classmethod
    def trainer_init(cls, init_info: NCCLTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: Optional[WeightSource] = None) -> "GlooTrainerWeightTransferEngine":
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, packed=init_info.packed,
                     packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
                     packed_num_buffers=init_info.packed_num_buffers)
        if not engine.is_sender:   # the other actor ranks only take part in the gathers
            return engine
        worker_info = NCCLWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port, rank_offset=1,
            world_size=init_info.world_size, packed=init_info.packed,
            packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
            packed_num_buffers=init_info.packed_num_buffers)
        # The engine workers block in the rendezvous inside init_weight_transfer_engine: ask them from a side
        # thread while this rank opens the group, as vLLM's NCCL trainer does.
        with ThreadPoolExecutor(max_workers=1) as pool:
            workers = pool.submit(engine.client.init_weight_transfer_engine, worker_init_payload(worker_info))
            # the NCCL communicator's stand-in (declared as vLLM's PyNcclCommunicator)
            engine.model_update_group = GlooCommunicator(  # pyright: ignore[reportAttributeAccessIssue]
                init_info.master_address, init_info.master_port, 0, init_info.world_size)
            workers.result()
        return engine

    def send_weights(self) -> None:
        with host_streams():
            super().send_weights()


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's NCCL worker engine (packed receive, layerwise reload) over gloo, in a vLLM worker."""

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
        if init_info.master_address is None or init_info.master_port is None:
            raise ValueError("the gloo weight transfer needs master_address and master_port")
        self.packed = init_info.packed
        self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
        self.packed_num_buffers = init_info.packed_num_buffers
        parallel = self.parallel_config   # this worker's rank, counted as vLLM's NCCL workers count theirs
        rank = parallel.data_parallel_index * parallel.world_size + parallel.rank + init_info.rank_offset
        # the NCCL communicator's stand-in (declared as vLLM's PyNcclCommunicator)
        self.model_update_group = GlooCommunicator(  # pyright: ignore[reportAttributeAccessIssue]
            init_info.master_address, init_info.master_port, rank, init_info.world_size)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class then synchronizes an accelerator, which a CPU host does not have.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: Any) -> None:
        with host_streams():
            super().receive_weights(update_info)
