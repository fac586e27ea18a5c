"""Full parameters out of a ZeRO-3 model, a piece at a time.

Each rank holds 1/dp of every parameter. Export and weight sync need full tensors, but never the whole
model at once (a 70B model does not fit on one device): parameters are gathered per module, or in
buckets of at most ``bucket_bytes``, inside ``deepspeed.zero.GatheredParameters``, and yielded as CPU
copies (or device copies) before the next piece is gathered. Every rank must iterate the generator to
the end: the gathers are collective.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch


def size_bounded_buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int
                         ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive ``(name, tensor)`` pairs in lists of at most ``bucket_bytes`` of *full* tensors (a
    ZeRO-3 parameter counts at its gathered size); a tensor larger than the bucket goes alone."""
    bucket, size = [], 0
    for name, param in named:
        nbytes = _full_numel(param) * param.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield bucket


def full_shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, full shape)`` of every parameter, in the order ``iter_full_param_buckets`` yields them
    (a ZeRO-3 parameter reports its gathered shape; nothing is gathered)."""
    return [(name, tuple(getattr(p, "ds_shape", p.shape))) for name, p in module.named_parameters()]


def _full_numel(param: torch.Tensor) -> int:
    """Elements of the full tensor: ZeRO-3 sets ``ds_numel`` on the parameters it partitions."""
    return int(getattr(param, "ds_numel", param.numel()))


def _per_module(module: torch.nn.Module) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in sub.named_parameters(recurse=False)
               if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            yield own


def iter_full_param_buckets(module: torch.nn.Module, *, bucket_bytes: Optional[int] = None,
                            to_cpu: bool = True, dtype: Optional[torch.dtype] = None
                            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of ``(name, full tensor)`` covering every parameter of ``module`` once (tied
    parameters once), each list gathered in one ``GatheredParameters`` and copied out before the next.

    bucket_bytes: None -> one list per module; else consecutive parameters in lists of at most this many
    bytes (a parameter larger than the bucket goes alone). Weight sync sends each list as one bucket.
    dtype: cast the copies (weight sync sends the rollout engine's dtype); None keeps the parameters'.
    """
    import deepspeed  # deepspeed: in the processes that build engines

    if bucket_bytes is None:
        groups = _per_module(module)
    else:
        groups = size_bounded_buckets(list(module.named_parameters()), bucket_bytes)
    for group in groups:
        params = [p for _, p in group]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            copies = [(name, p.data.detach().to(device="cpu" if to_cpu else p.data.device, dtype=dtype or p.dtype,
                                                copy=True))
                      for name, p in group]
        yield copies   # outside the gather: the consumer's work never holds the gathered parameters


def iter_full_params(module: torch.nn.Module, *, bucket_bytes: Optional[int] = None,
                     to_cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` for every parameter of ``module`` (see ``iter_full_param_buckets``)."""
    for bucket in iter_full_param_buckets(module, bucket_bytes=bucket_bytes, to_cpu=to_cpu):
        yield from bucket


def full_state_dict(module: torch.nn.Module, bucket_bytes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """All parameters and persistent buffers as full CPU tensors (for export on one rank)."""
    state = dict(iter_full_params(module, bucket_bytes=bucket_bytes))
    param_names = set(dict(module.named_parameters(remove_duplicate=False)))
    for name, buf in module.state_dict().items():
        if name not in param_names and name not in state:
            state[name] = buf.detach().to("cpu", copy=True)
    return state
