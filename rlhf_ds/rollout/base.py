"""The rollout-engine interface and the assembly of generated samples into an :class:`Experience`.

An engine takes prompts as token lists and returns, for each prompt, ``n`` responses as token lists
with the log-probability the engine assigned to each generated token. Responses end with the eos token
when the model stopped on its own; the reward functions check that, so a response cut at
``max_response_len`` earns nothing for a correct prefix.

Rollout log-probs are those of the *sampling* distribution: ``log_softmax(logits / temperature)``
(without top-p / top-k truncation), which is what the actor recomputes, so that truncated importance
sampling compares like with like.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import torch

from rlhf_ds.batch import Experience, pad_prompts, pad_responses


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling knobs (temperature 0 = greedy)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 16
    ignore_eos: bool = False        # keep generating past eos to max_new_tokens (fixed work for benchmarks)


@dataclass
class RolloutSample:
    """One generated response."""
    prompt_index: int               # index of its prompt in the request
    response: list[int]             # generated token ids (eos included when the model stopped)
    logprobs: list[float]           # one per response token


class RolloutEngine(Protocol):
    """What every rollout engine offers the rollout group (``rollout.engines`` builds them): generation,
    and its side of the weight-update protocol of ``rollout.weights``."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seed: int) -> list[RolloutSample]:
        """``n`` samples for each prompt, prompt-major (prompt 0's samples first). Same seed, same
        prompts, same engine -> the same samples."""
        ...

    def num_parameters(self) -> int:
        ...

    def weight_version(self) -> str:
        """The version of the weights it serves (``step-N``; ``default`` as loaded from disk)."""
        ...

    def direct_transfer(self) -> Optional[tuple[str, int]]:
        """(vLLM transfer backend, tensor-parallel size) when the actor's rank 0 sends the weights through
        vLLM's own transfer (``rollout.vllm_transfer``); None when buckets arrive by ``update_weights``."""
        ...

    def start_weight_update(self, manifest: list, version: str) -> None:
        """Check the actor's manifest against the engine's model; raise ``WeightMismatch`` to refuse."""
        ...

    def update_weights(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Check and keep one bucket of full parameters, in manifest order; returns how many."""
        ...

    def finish_weight_update(self) -> str:
        """Put the new weights live at once; returns their version."""
        ...


def generate(rollout_group: Any, prompts: list[list[int]], n: int, sampling: SamplingParams,
             seed: int) -> list[RolloutSample]:
    """Samples of every prompt, prompt-major, from all engines of ``rollout_group`` (prompts split
    over them; an engine's shard may be one prompt longer than another's)."""
    return generate_async(rollout_group, prompts, n, sampling, seed)()


def generate_async(rollout_group: Any, prompts: list[list[int]], n: int, sampling: SamplingParams,
                   seed: int) -> Callable[[], list[RolloutSample]]:
    """Start :func:`generate`; the returned call waits for the samples."""
    pending = rollout_group.dispatch_async("generate", prompts, n, sampling, seed, even=False)

    def wait() -> list[RolloutSample]:
        samples = pending.get()
        for row, sample in enumerate(samples):   # engine-local prompt indices -> indices into `prompts`
            sample.prompt_index = row // n
        return samples

    return wait


def build_experience(prompts: Sequence[Sequence[int]], samples: Sequence[RolloutSample], pad_id: int,
                     max_prompt_len: int, max_response_len: int, group_offset: int = 0) -> Experience:
    """Pad prompts (left) and responses (right) into an Experience with rollout log-probs.

    ``group_ids`` are ``group_offset + prompt_index``: the samples of one prompt share a group, and
    samples arrive prompt-major so a group's rows are adjacent.
    """
    prompt_rows = [prompts[s.prompt_index] for s in samples]
    prompt_ids, prompt_mask = pad_prompts(prompt_rows, pad_id, max(len(p) for p in prompt_rows))
    if prompt_ids.shape[1] > max_prompt_len:
        raise ValueError(f"prompt of {prompt_ids.shape[1]} tokens exceeds rollout.max_prompt_len="
                         f"{max_prompt_len}")
    response_ids, response_mask = pad_responses([s.response for s in samples], pad_id,
                                                max(1, max(len(s.response) for s in samples)))
    if response_ids.shape[1] > max_response_len:
        raise ValueError(f"engine returned {response_ids.shape[1]} tokens, more than "
                         f"rollout.max_response_len={max_response_len}")
    logprobs = torch.zeros_like(response_mask)
    for row, sample in enumerate(samples):
        logprobs[row, :len(sample.logprobs)] = torch.tensor(sample.logprobs, dtype=logprobs.dtype)
    return Experience(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                      response_mask=response_mask, rollout_logprobs=logprobs,
                      group_ids=torch.tensor([group_offset + s.prompt_index for s in samples]))
