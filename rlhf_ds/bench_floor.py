"""The floor of ``make bench``: the same GRPO step as one plain PyTorch process, no framework.

HF ``generate`` (sampling at temperature 1, every response run to the limit), the run's reward, group-
normalised advantages, then one forward / backward / AdamW step on the sequence-summed on-policy
surrogate, on every core. What a careful single-file script does; what the framework must beat.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from rlhf_ds.rewards.functions import exact_match


@dataclass
class FloorStep:
    step_s: float
    generate_s: float
    train_s: float
    generated_tokens: int
    train_seq_tokens: int


class FloorLoop:
    """One model, its tokenizer and an AdamW optimiser in this process."""

    def __init__(self, model_path: str, lr: float, threads: int = 0):
        # transformers: loaded when first needed
        from transformers import AutoModelForCausalLM

        # transformers: loaded when first needed
        from rlhf_ds.models.tiny import resolve_model_path

        # transformers: loaded when first needed
        from rlhf_ds.models.tokenizer import load_tokenizer

        path = resolve_model_path(model_path)
        self.threads = threads or os.cpu_count() or 1
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.tokenizer = load_tokenizer(path)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def step(self, prompts: list[str], answers: list[str], n: int, new_tokens: int, seed: int) -> FloorStep:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            tok = self.tokenizer
            batch = tok(prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                self.model.eval()
                # transformers types generate's self as a Protocol its own models do not satisfy
                sequences = self.model.generate(  # pyright: ignore[reportAttributeAccessIssue]
                    **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                    max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=tok.pad_token_id)
            t1 = time.perf_counter()
            prompt_len = batch["input_ids"].shape[1]
            responses = sequences[:, prompt_len:]
            texts = tok.batch_decode(responses, skip_special_tokens=True)
            finished = [bool((r == tok.eos_token_id).any()) for r in responses]
            rewards = torch.tensor(exact_match([p for p in prompts for _ in range(n)], texts,
                                               [a for a in answers for _ in range(n)], finished))
            grouped = rewards.view(-1, n)
            advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
            self.model.train()
            mask = torch.cat([batch["attention_mask"].repeat_interleave(n, 0), torch.ones_like(responses)], 1)
            logits = self.model(input_ids=sequences, attention_mask=mask).logits[:, prompt_len - 1:-1].float()
            logprobs = torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
            loss = -(advantages.unsqueeze(1) * logprobs).sum() / responses.numel()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
        finally:
            torch.set_num_threads(previous)
        return FloorStep(t2 - t0, t1 - t0, t2 - t1, responses.numel(), int(mask.sum()))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
