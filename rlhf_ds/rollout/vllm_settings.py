"""What a vLLM engine is built with, derived from the config: pure functions, no vLLM import.

Everything the ``rollout.vllm`` section says reaches vLLM through :func:`engine_kwargs`, so the whole
mapping (CUDA graphs, memory, tensor parallelism, sleep mode, the weight-transfer backend, the executor
under the deepspeed launcher) is unit-tested on machines without a GPU or vLLM.

Log-probs: vLLM's default ``raw_logprobs`` are taken *before* temperature scaling, so they are not the
sampling distribution at ``rollout.temperature``. ``processed_logprobs`` are taken after temperature and
after top-k / top-p masking: with top_k = -1 and top_p = 1 (the only setting the config accepts with this
backend) that is exactly ``log_softmax(logits / temperature)``, the untruncated distribution the actor
recomputes and the losses assume. Greedy requests (temperature 0) get the untempered ``log_softmax``,
like the HF engine.
"""
from __future__ import annotations

import os
from typing import Any

LOGPROBS_MODE = "processed_logprobs"

# The weight-transfer backends: NCCL broadcast from actor rank 0 to engines on other GPUs, CUDA IPC
# handles when actor and engines share GPUs; on CPU hosts the same NCCL protocol over gloo (engines of
# their own, ``rollout.vllm_gloo``), and shared-memory files for an engine living in the actor rank's own
# process (the deepspeed launcher). The last two are registered by ``rollout.vllm_worker`` in vLLM's workers.
GLOO_BACKEND = "rlhf_ds_gloo"
SHM_BACKEND = "rlhf_ds_shm"
TRANSFER_BACKENDS = ("nccl", "ipc", GLOO_BACKEND, SHM_BACKEND)
RENDEZVOUS_BACKENDS = ("nccl", GLOO_BACKEND)   # actor rank 0 hosts a group the engine workers join

# The worker extension mixed into every vLLM worker (registers the CPU backends, answers liveness queries).
WORKER_EXTENSION = "rlhf_ds.rollout.vllm_worker.RolloutWorkerExtension"


def transfer_backend(on_gpu: bool, colocated: bool, local: bool = False) -> str:
    """How the actor's weights reach an engine: nccl (separate GPUs), ipc (colocated GPUs), gloo (CPU
    hosts), or files when the buckets come from the engine's own process (``local``: a rank's engine under
    the deepspeed launcher, or a script driving an engine directly)."""
    if local:
        return SHM_BACKEND
    if not on_gpu:
        return GLOO_BACKEND
    return "ipc" if colocated else "nccl"


def compilation_config(vllm_cfg: Any) -> dict[str, Any]:
    """``compilation_config`` for ``LLM(...)``: the CUDA-graph mode and capture sizes when set (empty
    means vLLM's defaults). vLLM's CPU platform replaces both (no CUDA graphs there)."""
    out: dict[str, Any] = {}
    if vllm_cfg.cudagraph_mode != "auto":
        out["cudagraph_mode"] = vllm_cfg.cudagraph_mode
    if vllm_cfg.cudagraph_capture_sizes:
        out["cudagraph_capture_sizes"] = sorted(set(vllm_cfg.cudagraph_capture_sizes))
    return out


def engine_kwargs(vllm_cfg: Any, *, model_path: str, tokenizer_path: str, dtype: str, seed: int,
                  max_model_len: int, on_gpu: bool, colocated: bool, spmd: bool,
                  local_updates: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for one engine.

    vllm_cfg: the ``rollout.vllm`` section; dtype: "fp32" / "bf16" (the trained roles' precision);
    spmd: under the deepspeed launcher each rank hosts its own engine with vLLM's external-launcher
    executor (GPU only: the caller refuses it on CPU); its updates come from its own process.
    local_updates: the updates come from the engine's own process (buckets handed to ``update_weights``).
    """
    if not on_gpu and vllm_cfg.kv_cache_memory_bytes <= 0:
        raise ValueError("rollout.vllm.kv_cache_memory_bytes must be set on a CPU host: vLLM's CPU default "
                         "takes gpu_memory_utilization of host RAM (0.92 by default) for the KV cache; e.g. "
                         "rollout.vllm.kv_cache_memory_bytes=268435456 (256 MiB) for tiny models")
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": tokenizer_path or model_path,
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        "seed": seed,
        "max_model_len": max_model_len,
        "enforce_eager": vllm_cfg.enforce_eager,
        "tensor_parallel_size": vllm_cfg.tensor_parallel_size,
        "enable_prefix_caching": vllm_cfg.enable_prefix_caching,
        "logprobs_mode": LOGPROBS_MODE,
        "worker_extension_cls": WORKER_EXTENSION,
        "weight_transfer_config": {"backend": transfer_backend(on_gpu, colocated, spmd or local_updates)},
        "skip_tokenizer_init": False,
    }
    if vllm_cfg.kv_cache_memory_bytes > 0:
        kwargs["kv_cache_memory_bytes"] = vllm_cfg.kv_cache_memory_bytes
    else:
        kwargs["gpu_memory_utilization"] = vllm_cfg.gpu_memory_utilization
    if not vllm_cfg.enforce_eager:
        cc = compilation_config(vllm_cfg)
        if cc:
            kwargs["compilation_config"] = cc
    if vllm_cfg.enable_sleep_mode:
        if not on_gpu:
            raise ValueError("rollout.vllm.enable_sleep_mode=true needs a GPU (vLLM supports sleep mode on "
                             "CUDA / ROCm / XPU only); set it to false on this host")
        kwargs["enable_sleep_mode"] = True
    if spmd:
        kwargs["distributed_executor_backend"] = "external_launcher"
    elif vllm_cfg.tensor_parallel_size > 1:
        # The engine's Ray actor holds its tensor-parallel GPUs itself (one bundle of that many GPUs,
        # ``cluster.placement``); vLLM's Ray executor would instead look for one bundle per GPU in the
        # actor's placement group. Worker processes of its own see exactly the actor's GPUs.
        kwargs["distributed_executor_backend"] = "mp"
    return kwargs


def process_env(cache_dir: str, in_process: bool, threads: int, *, on_gpu: bool = False,
                backend: str = SHM_BACKEND) -> dict[str, str]:
    """Environment set before vLLM is imported in the engine's process.

    in_process: the engine core runs in this process (a Ray actor that hosts nothing else) instead of
    spawning an engine-core and a worker process (~20 s more start-up on 2 cores, docs/rollouts.md).
    cache_dir: vLLM's and inductor's caches and the IPC socket files, which vLLM never removes.
    backend: the weight transfer. CUDA IPC handles (``reduce_tensor`` tuples holding classes and dtypes)
    cross into an engine core of its own process only through vLLM's msgpack encoder, which refuses them
    unless its pickle fallback is allowed, as vLLM's own RL examples do.
    Logging: vLLM's warnings on GPU (memory, kernels it falls back from: what a first run needs to see);
    errors only on CPU, where it warns about the missing GPU kernels on every start.
    """
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1",
           "VLLM_CACHE_ROOT": os.path.join(cache_dir, "vllm"),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "inductor"),
           "VLLM_RPC_BASE_PATH": os.path.join(cache_dir, "rpc"),
           "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING" if on_gpu else "ERROR"),
           "OMP_NUM_THREADS": str(threads)}
    if backend == "ipc" and not in_process:
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return env
