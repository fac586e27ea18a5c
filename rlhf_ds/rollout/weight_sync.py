"""Actor -> rollout-engine weight sync.

The actor's ``weights()`` yields full (ZeRO-3 gathered) parameters as ``(name, tensor)`` pairs; the
gather is collective, so every actor rank walks the generator, and only rank 0 sends. Pairs are packed
into buckets of about ``bucket_mb`` so neither side ever holds the whole model twice.

Transports:
- CPU, Ray (here): rank 0 puts each bucket in Ray's shared-memory object store once, and every engine
  reads it from there (zero-copy on the same node) and loads it; at most two buckets are in flight.
- SPMD (deepspeed launcher): every rank owns its engine and loads the pairs directly.
- GPU (where it would go): engines on other GPUs join an NCCL group with actor rank 0 and receive each
  bucket by broadcast; a colocated engine receives CUDA-IPC handles of rank 0's tensors instead of
  copies. Both plug in as another ``send_bucket`` below; the engine side stays ``update_weights``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

NamedTensors = list[tuple[str, torch.Tensor]]


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> Iterator[NamedTensors]:
    """Group consecutive pairs into lists of at most ``bucket_mb`` MiB (a bigger tensor goes alone)."""
    limit = bucket_mb * 2 ** 20
    bucket: NamedTensors = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        # The engine layer already hands out CPU copies (never views into ZeRO-3 buffers); .cpu() is a
        # no-op then, and a copy for a producer that yields device tensors.
        bucket.append((name, tensor.detach().cpu()))
        size += nbytes
    if bucket:
        yield bucket


def send_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_mb: float,
                 send_bucket: Callable[[NamedTensors], None] | None) -> int:
    """Walk the (collective) generator; ``send_bucket`` each bucket when given (rank 0), else just
    take part in the gathers (other ranks). Returns the number of tensors walked."""
    count = 0
    for bucket in buckets(named_tensors, bucket_mb):
        count += len(bucket)
        if send_bucket is not None:
            send_bucket(bucket)
    return count


def push_to_ray_engines(actor_worker, rank: int, engine_handles: list, bucket_mb: float) -> int:
    """Runs inside each actor rank's process (``RoleGroup.apply_all``): gather, and from rank 0 send
    each bucket through the object store to every rollout engine. Returns tensors sent (0 off rank 0)."""
    import ray

    in_flight: list = []

    def send(bucket: NamedTensors) -> None:
        ref = ray.put(bucket)
        if len(in_flight) >= 2:   # bound memory: wait for the older bucket to be loaded everywhere
            ray.get(in_flight.pop(0))
        in_flight.append([h.call.remote("update_weights", (ref,), {}) for h in engine_handles])

    send_fn = send if rank == 0 else None
    count = send_weights(actor_worker.weights(), bucket_mb, send_fn)
    for futures in in_flight:
        ray.get(futures)
    return count if rank == 0 else 0


def load_into_local_engine(actor_worker, engine, bucket_mb: float) -> int:
    """SPMD: every rank gathers and loads into its own engine."""
    return send_weights(actor_worker.weights(), bucket_mb, engine.update_weights)
