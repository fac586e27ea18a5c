"""Rollouts with vLLM (``rollout.backend=vllm``): the production engine, CUDA graphs on GPU.

One :class:`VLLMRolloutEngine` per rank of the rollout group, wrapping ``vllm.LLM`` built from
``rollout.vllm`` (``vllm_settings.engine_kwargs``). It speaks the engine contract of ``rollout.base``
(token ids in, n samples per prompt with the log-prob of each sampled token at the training temperature,
seeded per request) and the update protocol of ``rollout.weights``.

Weight updates arrive one of two ways:
- through vLLM's own transfer, driven from actor rank 0 by ``rollout.vllm_transfer``: NCCL to engines on
  other GPUs, CUDA IPC to colocated ones, the NCCL protocol over gloo on CPU hosts (``rollout.vllm_gloo``);
  the engine forwards the ``transfer_*`` control calls to vLLM;
- as buckets (``update_weights``), staged as safetensors files in ``/dev/shm`` and loaded at
  ``finish_weight_update`` by the shared-memory backend of ``rollout.vllm_worker``: an engine living in
  its actor rank's own process (the deepspeed launcher).
Either way the manifest is checked before vLLM's update starts: a bad update is refused whole.

Sleep mode (``rollout.vllm.enable_sleep_mode``, colocated GPUs): the engine falls asleep at level 2 as
soon as it is built, so DeepSpeed loads into the memory vLLM measured for itself; weights and KV cache are
released, not copied to host, since every generation is preceded by a sync that overwrites them. The
trainer puts it to sleep after each rollout (``sleep``); a sync wakes the weights, loads them, then wakes
the KV cache (docs/gpu.md gives the whole order).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterable, Optional, Sequence

import torch

from rlhf_ds.config import Config
from rlhf_ds.engine.cuda import cuda_memory_used_bytes
from rlhf_ds.engine.dist import has_gpu
from rlhf_ds.env import process_rank
from rlhf_ds.models.tiny import default_cache_dir, resolve_model_path
from rlhf_ds.rollout.base import RolloutSample, SamplingParams
from rlhf_ds.rollout.precision import rollout_dtype, rollout_torch_dtype
from rlhf_ds.rollout.vllm_settings import SHM_BACKEND, engine_kwargs, process_env
from rlhf_ds.rollout.weights import UpdateSession, active_session, expected_manifest

# Level 2 releases weights and KV cache without copying the weights to host memory (level 1 copies them,
# only for the next sync to overwrite them).
SLEEP_LEVEL = 2

def _mix64(x: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def request_seed(seed: int, rank: int, index: int) -> int:
    """The vLLM seed of prompt ``index`` of a request to engine ``rank``: a function of the request seed
    only, so the same request draws the same samples whatever ran before. vLLM seeds the n samples of a
    prompt with seed, seed + 1, ..., so consecutive seeds would make prompt i's second sample replay
    prompt i+1's first stream: the seeds are hashed far apart instead."""
    return _mix64(_mix64(_mix64(seed) ^ rank) ^ index) >> 2


def sample_from_output(prompt_index: int, token_ids: Sequence[int], logprobs: Sequence[dict]) -> RolloutSample:
    """A RolloutSample from one vLLM completion: its tokens (eos included when it stopped on eos, as vLLM
    reports it) and the log-prob vLLM gave each sampled token."""
    tokens = list(token_ids)
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(logprobs)} log-prob entries for {len(tokens)} tokens")
    return RolloutSample(prompt_index, tokens, [float(step[tok].logprob) for step, tok in zip(logprobs, tokens, strict=True)])


class VLLMRolloutEngine:
    """One vLLM engine (``tensor_parallel_size`` devices) serving the actor's current weights."""

    def __init__(self, cfg: Config, spmd: bool = False, in_process: Optional[bool] = None,
                 local_updates: bool = False):
        """spmd: this rank's engine under the deepspeed launcher; in_process: vLLM's engine core in this
        process (default: yes in a Ray actor, which hosts nothing else; no under the launcher);
        local_updates: weights arrive as buckets from this process (``update_weights``; always under the
        launcher), not through a transfer driven by the actor's rank 0."""
        self.rank, self.on_gpu = process_rank(), has_gpu()
        model_path = resolve_model_path(cfg.actor.model_path)
        tokenizer_path = resolve_model_path(cfg.actor.tokenizer_path) if cfg.actor.tokenizer_path else model_path
        self.kwargs = engine_kwargs(cfg.rollout.vllm, model_path=model_path, tokenizer_path=tokenizer_path,
                                    dtype=rollout_dtype(cfg), seed=cfg.seed, on_gpu=self.on_gpu,
                                    colocated=cfg.cluster.colocate, spmd=spmd, local_updates=local_updates,
                                    max_model_len=cfg.rollout.max_prompt_len + cfg.rollout.max_response_len)
        # A Ray actor hosts nothing but this engine: run vLLM's engine core in its process (start-up in
        # seconds, not tens of seconds). Under the launcher it shares the rank's process with the trainer.
        in_process = (not spmd) if in_process is None else in_process
        os.environ.update(process_env(str(default_cache_dir() / "vllm"), in_process=in_process,
                                      threads=int(os.environ.get("OMP_NUM_THREADS", "1")), on_gpu=self.on_gpu,
                                      backend=self.kwargs["weight_transfer_config"]["backend"]))
        self.llm = self._start_llm(self.kwargs)
        self.expected = expected_manifest(model_path, rollout_torch_dtype(cfg))
        self.sleep_mode = bool(self.kwargs.get("enable_sleep_mode"))
        self.released: set[str] = set()   # what sleep released and no wake-up brought back
        self.session: Optional[UpdateSession] = None
        self.staged: list[str] = []
        self.staging_dir = tempfile.mkdtemp(prefix="rlhf_ds_weights_",
                                            dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        if self.sleep_mode:   # before DeepSpeed loads: the trained roles get this memory until the first sync
            self.sleep()

    @staticmethod
    def _start_llm(kwargs: dict) -> Any:
        from vllm import LLM  # vllm: only with rollout.backend=vllm

        return LLM(**kwargs)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seed: int) -> list[RolloutSample]:
        if not prompts:
            return []
        from vllm import SamplingParams as VllmSampling  # vllm: only with rollout.backend=vllm
        from vllm.inputs import TokensPrompt  # vllm: only with rollout.backend=vllm

        if self.released:
            raise RuntimeError(f"vLLM engine {self.rank} is asleep ({', '.join(sorted(self.released))} released): "
                               f"a weight sync wakes it; sleep level {SLEEP_LEVEL} keeps no weights to wake with")
        params = [VllmSampling(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                               top_k=sampling.top_k if sampling.top_k > 0 else 0,
                               max_tokens=sampling.max_new_tokens, ignore_eos=sampling.ignore_eos, logprobs=0,
                               seed=request_seed(seed, self.rank, i), detokenize=False)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return [sample_from_output(i, c.token_ids, c.logprobs) for i, out in enumerate(outputs)
                for c in sorted(out.outputs, key=lambda c: c.index)]

    def num_parameters(self) -> int:
        return sum(int(torch.Size(p.shape).numel()) for p in self.expected)

    def weight_version(self) -> str:
        return self.llm.get_weight_version()

    # ---------------------------------------------------------------- sleep mode (colocated GPUs)
    def sleep(self) -> dict[str, float]:
        """Release weights and KV cache until the next sync (sleep mode; a no-op otherwise). Returns the
        GPU memory in use before and after, in GiB (every process on this GPU; empty on a CPU host)."""
        if not self.sleep_mode or self.released:
            return {}
        before = cuda_memory_used_bytes() if self.on_gpu else None
        self.llm.sleep(level=SLEEP_LEVEL)
        self.released = {"weights", "kv_cache"}
        if before is None:
            return {}
        return {"memory/gpu_awake_gib": before / 2 ** 30, "memory/gpu_asleep_gib": cuda_memory_used_bytes() / 2 ** 30}

    def _wake(self, tags: list[str]) -> None:
        if self.released.intersection(tags):
            self.llm.wake_up(tags=tags)
            self.released.difference_update(tags)

    # ---------------------------------------------------------------- the update protocol (rollout.weights)
    def direct_transfer(self) -> Optional[tuple[str, int]]:
        """(vLLM backend, tensor-parallel size) when vLLM moves the tensors itself (NCCL / IPC on GPUs, gloo
        on CPU); None when buckets arrive through ``update_weights`` (the shared-memory backend)."""
        backend = self.kwargs["weight_transfer_config"]["backend"]
        return None if backend == SHM_BACKEND else (backend, self.kwargs["tensor_parallel_size"])

    def start_weight_update(self, manifest: list, version: str) -> None:
        self._drop_staged()
        self.session = None
        self.session = UpdateSession(self.expected, manifest, version, f"vLLM engine {self.rank}")

    def update_weights(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> int:
        from safetensors.torch import save_file  # safetensors: only on the weight-update path

        bucket = list(bucket)
        session = self._session()
        try:
            session.accept(bucket)
        except Exception:
            self._abort()
            raise
        path = os.path.join(self.staging_dir, f"bucket{len(self.staged):05d}.safetensors")
        save_file({name: t.detach().contiguous() for name, t in bucket}, path)
        self.staged.append(path)
        return len(bucket)

    def finish_weight_update(self) -> str:
        """Put the new weights live; return their version. Staged buckets (the shared-memory backend) are
        loaded here in one vLLM update; a direct transfer went live in ``transfer_finish``."""
        session = self._session()
        direct = self.direct_transfer()
        if direct is not None:
            self.session = None
            if self.weight_version() != session.version:
                raise RuntimeError(f"vLLM engine {self.rank}: the {direct[0]} transfer of {session.version!r} did "
                                   f"not finish (serving {self.weight_version()!r})")
            return session.version
        try:
            session.complete()
        except Exception:
            self._abort()
            raise
        self._wake(["weights"])
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": {"paths": list(self.staged)}})
        self.llm.finish_weight_update(weight_version=session.version)
        self._after_update()
        self.session = None
        return session.version

    # Direct transfers: actor rank 0 drives vLLM's trainer-side engine, which calls these (the control plane).
    def transfer_init(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def transfer_start(self) -> None:
        self._session()   # the manifest was checked by start_weight_update
        self._wake(["weights"])
        self.llm.start_weight_update()

    def transfer_update(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": update_info})

    def transfer_finish(self) -> None:
        self.llm.finish_weight_update(weight_version=self._session().version)
        self._after_update()

    def shutdown(self) -> None:
        self._drop_staged()
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    # ---------------------------------------------------------------- internals
    def _session(self) -> UpdateSession:
        return active_session(self.session, f"vLLM engine {self.rank}")

    def _after_update(self) -> None:
        self._wake(["kv_cache"])
        self.llm.reset_prefix_cache()   # cached prefixes hold keys / values of the old weights
        self._drop_staged()

    def _abort(self) -> None:
        self._drop_staged()
        self.session = None

    def _drop_staged(self) -> None:
        for path in self.staged:
            if os.path.exists(path):
                os.remove(path)
        self.staged = []

    def __del__(self) -> None:
        staging_dir = getattr(self, "staging_dir", None)
        if staging_dir:
            shutil.rmtree(staging_dir, ignore_errors=True)
