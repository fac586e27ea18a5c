"""Splitting a batch by rank and putting the per-rank results back together.

Shared by the Ray groups and the local (deepspeed-launcher) groups so both cut a batch the same way:
contiguous, equal shards, rank order. Equal shards matter under ZeRO-3: every rank must run the same
number of forward passes, or the parameter all-gathers of one rank wait forever for the others.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_ds.batch import Experience


def shard_sizes(total: int, num_ranks: int, what: str = "batch") -> list[int]:
    """Equal contiguous shard sizes; refuses a batch that does not divide evenly."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if total % num_ranks:
        raise ValueError(f"{what} of {total} rows cannot be split evenly over {num_ranks} ranks; "
                         f"choose sizes that are multiples of the number of ranks")
    return [total // num_ranks] * num_ranks


def split_by_rank(batch: Any, num_ranks: int, *, even: bool = True) -> list[Any]:
    """Cut an Experience, a tensor (dim 0) or a list into ``num_ranks`` contiguous shards.

    ``even=False`` allows uneven shards (sizes differ by at most one) for work that runs no collective,
    such as rollout engines generating independently.
    """
    total = len(batch)
    if even:
        sizes = shard_sizes(total, num_ranks)
    else:
        base, extra = divmod(total, num_ranks)
        sizes = [base + (1 if r < extra else 0) for r in range(num_ranks)]
    if isinstance(batch, Experience):
        return batch.split(sizes)
    starts = [sum(sizes[:r]) for r in range(num_ranks)]
    return [batch[s:s + n] for s, n in zip(starts, sizes, strict=True)]


def concat_results(results: Sequence[Any]) -> Any:
    """Rank-ordered results of a dispatched call, concatenated back into one batch-shaped result.

    Tensors concatenate along dim 0, Experiences row-wise, lists are chained, dicts and tuples
    concatenate field by field; ``None`` from every rank stays ``None``.
    """
    first = results[0]
    if first is None:
        if any(r is not None for r in results):
            raise TypeError("some ranks returned None and others a value")
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(list(results), dim=0)
    if isinstance(first, Experience):
        return Experience.cat(list(results))
    if isinstance(first, list):
        return [item for r in results for item in r]
    if isinstance(first, tuple):
        return tuple(concat_results([r[i] for r in results]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: concat_results([r[key] for r in results]) for key in first}
    raise TypeError(f"cannot concatenate dispatched results of type {type(first).__name__}; "
                    f"return a tensor, Experience, list, tuple or dict")
