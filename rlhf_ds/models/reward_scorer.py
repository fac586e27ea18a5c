"""A trained reward model (a ``reward_hf/`` directory of `rlhf-ds rm`, or any directory
``check_reward_head`` accepts) as a scoring function of text, for `rlhf-ds serve-reward`.

The score of a sample is what ``workers.reward_model`` reads in a run: the value head at the last real
token of prompt + response. The server gets text, so the tokens are rebuilt the way a run builds them:
the prompt as ``data.prompts.encode_prompt`` encodes it (in the chat template when asked), the response's
text without special tokens, then eos when the sample finished (the response text never holds it). A
text that does not decode-encode to the sampled tokens scores as its re-encoding. Plain PyTorch on CPU
in float32, no DeepSpeed.
"""
from __future__ import annotations

import math
import threading

import torch

from rlhf_ds.batch import Experience, pad_prompts, pad_responses
from rlhf_ds.data.prompts import encode_prompt
from rlhf_ds.models.files import check_reward_head
from rlhf_ds.models.tokenizer import load_tokenizer
from rlhf_ds.models.value_model import ValueModel


class RewardModelScorer:
    """(prompts, responses, answers, finished) -> scores of the reward model at ``path``, ``batch_size``
    sequences per forward pass; one call at a time (the server calls it from several threads)."""

    def __init__(self, path: str, *, chat_template: bool = False, batch_size: int = 16):
        check_reward_head(path, "serve-reward")
        self.tokenizer = load_tokenizer(path)
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"--chat-template: the tokenizer saved with {path} has no chat template; serve it "
                             "without --chat-template (prompts as plain text)")
        self.model = ValueModel.from_pretrained(path, dtype=torch.float32).eval()
        self.chat_template, self.batch_size = chat_template, max(1, batch_size)
        self._lock = threading.Lock()

    def token_ids(self, prompt: str, response: str, finished: bool) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of one sample, as a run feeds them to the reward model."""
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if finished:
            response_ids = response_ids + [self.tokenizer.eos_token_id]
        return encode_prompt(self.tokenizer, prompt, self.chat_template), response_ids

    @torch.no_grad()
    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = pad_prompts([p for p, _ in pairs], pad)
        response_ids, response_mask = pad_responses([r for _, r in pairs], pad)
        exp = Experience(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                         response_mask=response_mask, group_ids=torch.arange(len(pairs)))
        values = self.model(input_ids=exp.input_ids, attention_mask=exp.attention_mask,
                            position_ids=exp.position_ids).float()
        last = exp.prompt_len + exp.response_mask.sum(dim=1).long() - 1   # an empty response: the prompt's end
        return values.gather(1, last.unsqueeze(1)).squeeze(1).tolist()

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                 ) -> list[float]:
        pairs = [self.token_ids(p, r, f) for p, r, f in zip(prompts, responses, finished, strict=True)]
        scores: list[float] = []
        with self._lock:
            for start in range(0, len(pairs), self.batch_size):
                scores += self._score_batch(pairs[start:start + self.batch_size])
        bad = [k for k, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"the reward model produced the non-finite score {scores[bad[0]]} for sample {bad[0]}")
        return scores
