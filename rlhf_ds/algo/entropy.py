"""Token entropy from logits, chunked so it never builds a second vocabulary-sized tensor.

H = logsumexp(x) - sum_v softmax(x)_v x_v. A plain autograd version keeps softmax(x) of every token
for the backward pass: a second [B, T, V] tensor, often the largest allocation of the step. Here the
forward pass and the backward pass both walk the tokens in chunks and recompute the softmax per chunk;
only the logits (which exist anyway) are saved. The gradient is dH/dx = -p * (x - sum_v p_v x_v).
"""
from __future__ import annotations

from typing import Iterator

import torch


def _blocks(num_rows: int, num_steps: int, chunk: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, step slice) blocks of a [rows, steps] grid, about ``chunk`` tokens each."""
    if num_steps <= chunk:
        rows_per_block = max(1, chunk // max(num_steps, 1))
        for start in range(0, num_rows, rows_per_block):
            yield slice(start, start + rows_per_block), slice(0, num_steps)
    else:
        for row in range(num_rows):
            for start in range(0, num_steps, chunk):
                yield slice(row, row + 1), slice(start, start + chunk)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _ChunkedEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk: int) -> torch.Tensor:  # logits [B, T, V] -> [B, T]
        out = logits.new_empty(logits.shape[:-1], dtype=_compute_dtype(logits.dtype))
        for rows, steps in _blocks(logits.shape[0], logits.shape[1], chunk):
            x = logits[rows, steps].to(out.dtype)
            lse = torch.logsumexp(x, dim=-1)
            probs = torch.exp(x - lse.unsqueeze(-1))
            out[rows, steps] = lse - (probs * x).sum(dim=-1)
        ctx.save_for_backward(logits)
        ctx.chunk = chunk
        return out

    # torch types once_differentiable's wrapper with a positional-only ctx, which Function.backward's is not
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # pyright: ignore[reportIncompatibleMethodOverride]
        (logits,) = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows, steps in _blocks(logits.shape[0], logits.shape[1], ctx.chunk):
            x = logits[rows, steps].to(grad_out.dtype)
            probs = torch.softmax(x, dim=-1)
            mean_x = (probs * x).sum(dim=-1, keepdim=True)
            grad[rows, steps] = (-grad_out[rows, steps].unsqueeze(-1) * probs * (x - mean_x)).to(grad.dtype)
        return grad, None


def entropy_from_logits(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) per position.

    Args:
        logits: [..., V] finite logits (at least 2-D; [B, T, V] or [N, V] are never copied whole).
        chunk: tokens per block; peak extra memory is about ``chunk * V`` floats.
    Returns:
        [...] entropies in float32 (float64 for float64 logits); differentiable w.r.t. logits.
    """
    if chunk <= 0:
        raise ValueError(f"entropy chunk must be > 0, got {chunk}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dims, got shape {tuple(logits.shape)}")
    lead_shape = logits.shape[:-1]
    if logits.dim() == 2:
        grid = logits.unsqueeze(0)
    elif logits.dim() == 3:
        grid = logits
    else:
        grid = logits.flatten(0, -3)
    return _ChunkedEntropy.apply(grid, chunk).reshape(lead_shape)
