"""Forward passes over Experience in micro-batches, and what is read off their outputs.

Sequence layout (``batch.Experience``): prompt left-padded to P, response right-padded to R. The logits
(and the critic's values) that belong to response token t sit at position P + t - 1 of the full
sequence: the state *before* the token was emitted.
"""
from __future__ import annotations

from typing import Callable

import torch

from rlhf_ds.batch import Experience, packed_micro_batches


def model_inputs(exp: Experience, device: torch.device) -> dict[str, torch.Tensor]:
    return {"input_ids": exp.input_ids.to(device), "attention_mask": exp.attention_mask.to(device),
            "position_ids": exp.position_ids.to(device)}


def response_slice(exp: Experience) -> slice:
    """Positions [P-1, P+R-1) of the full sequence: the ones that score the R response tokens."""
    return slice(exp.prompt_len - 1, exp.prompt_len + exp.response_len - 1)


def response_logits(model: Callable, exp: Experience, device: torch.device, temperature: float = 1.0
                    ) -> torch.Tensor:
    """[B, R, V] float32 logits of the response tokens, divided by the sampling temperature (so the
    log-probs are those of the distribution the rollout sampled from)."""
    out = model(**model_inputs(exp, device), use_cache=False)
    logits = out.logits[:, response_slice(exp)].float()
    return logits / temperature if temperature != 1.0 else logits


def logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """logits [B, R, V], token_ids [B, R] -> log pi(token) [B, R] (float32)."""
    logits = logits.float()
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def policy_logprobs(model: Callable, exp: Experience, micro_batch_size: int, temperature: float,
                    device: torch.device) -> torch.Tensor:
    """[B, R] log-probs of the response tokens at ``temperature``, micro-batch by micro-batch, on CPU
    (the actor's old log-probs and the reference's log-probs are the same computation)."""
    def one(micro: Experience) -> torch.Tensor:
        logits = response_logits(model, micro, device, temperature)
        return logprobs_from_logits(logits, micro.response_ids.to(device))

    return in_micro_batches(one, exp, micro_batch_size)


def response_values(model: Callable, exp: Experience, device: torch.device) -> torch.Tensor:
    """[B, R] float32 values of the states before each response token (ValueModel output)."""
    values = model(**model_inputs(exp, device))
    return values[:, response_slice(exp)].float()


def last_token_index(exp: Experience) -> torch.Tensor:
    """[B] position of each row's last real token in the full sequence (P - 1 for an empty response)."""
    lengths = exp.response_mask.sum(dim=1).long()
    return exp.prompt_len + lengths - 1


def in_micro_batches(fn: Callable[[Experience], torch.Tensor], exp: Experience, micro_batch_size: int
                     ) -> torch.Tensor:
    """Apply ``fn`` to the packed micro-batches of ``exp``; the results, [B] or [B, R] on CPU, back in
    ``exp``'s row order (response positions past a micro-batch's own length are 0)."""
    out = None
    for idx, micro in packed_micro_batches(exp, micro_batch_size):
        result = fn(micro).detach().cpu()
        if out is None:
            shape = (len(exp),) if result.dim() == 1 else (len(exp), exp.response_len)
            out = torch.zeros(shape, dtype=result.dtype)
        if result.dim() == 1:
            out[idx] = result
        else:
            out[idx, :result.shape[1]] = result
    if out is None:
        raise ValueError("a forward pass over an Experience of no rows")
    return out


def require_fields(role: str, exp: Experience, names: tuple[str, ...]) -> None:
    missing = [n for n in names if getattr(exp, n) is None]
    if missing:
        raise ValueError(f"{role}: Experience is missing {missing}, needed for this step")
