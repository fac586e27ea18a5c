"""The vLLM engine's settings from the config (GPU-only ones included), the weight-update protocol's
checks, and the GPU transfers' init info, bucket source and rendezvous ranks (fakes where a GPU is needed)."""
import pytest
import torch

from rlhf_ds.config import ConfigError, config_from_dict, load_config
from rlhf_ds.rollout.vllm_settings import (GLOO_BACKEND, LOGPROBS_MODE, SHM_BACKEND, compilation_config,
                                           engine_kwargs, process_env, transfer_backend)
from rlhf_ds.rollout.weights import (ParamSpec, UpdateSession, WeightMismatch, check_manifest, expected_manifest,
                                     manifest_of)


def _cfg(*overrides):
    """The config's own defaults (the tiny recipes set eager mode and a KV-cache size for CPU hosts)."""
    return config_from_dict({}, ["actor.model_path=tiny:llama-micro", "rollout.backend=vllm", *overrides])


def _kwargs(cfg, **kw):
    args = dict(model_path="/m", tokenizer_path="/t", dtype="bf16", seed=3, max_model_len=48, on_gpu=True,
                colocated=False, spmd=False)
    args.update(kw)
    return engine_kwargs(cfg.rollout.vllm, **args)


def test_gpu_defaults_use_cuda_graphs_and_the_memory_fraction():
    kw = _kwargs(_cfg())
    assert kw["enforce_eager"] is False and "compilation_config" not in kw   # vLLM's default graph list
    assert kw["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in kw
    assert kw["logprobs_mode"] == LOGPROBS_MODE == "processed_logprobs"
    assert kw["weight_transfer_config"] == {"backend": "nccl"}
    assert kw["worker_extension_cls"] == "rlhf_ds.rollout.vllm_worker.RolloutWorkerExtension"
    assert (kw["model"], kw["tokenizer"], kw["dtype"], kw["seed"], kw["max_model_len"]) == ("/m", "/t", "bfloat16", 3, 48)
    assert kw["tensor_parallel_size"] == 1 and kw["enable_prefix_caching"] is True
    assert "enable_sleep_mode" not in kw and "distributed_executor_backend" not in kw


def test_every_vllm_key_reaches_the_engine():
    cfg = _cfg("rollout.vllm.cudagraph_mode=FULL_AND_PIECEWISE", "rollout.vllm.cudagraph_capture_sizes=[8,1,4,8]",
               "rollout.vllm.enable_sleep_mode=true", "cluster.colocate=true",
               "rollout.vllm.enable_prefix_caching=false", "rollout.vllm.gpu_memory_utilization=0.3")
    kw = _kwargs(cfg, colocated=True)
    assert kw["compilation_config"] == {"cudagraph_mode": "FULL_AND_PIECEWISE", "cudagraph_capture_sizes": [1, 4, 8]}
    assert kw["enable_sleep_mode"] is True
    assert kw["enable_prefix_caching"] is False and kw["gpu_memory_utilization"] == 0.3
    assert kw["weight_transfer_config"] == {"backend": "ipc"}   # colocated GPUs: CUDA IPC handles
    kw = _kwargs(_cfg("rollout.vllm.tensor_parallel_size=4"))
    assert kw["tensor_parallel_size"] == 4
    assert kw["distributed_executor_backend"] == "mp"   # the engine's actor holds its 4 GPUs itself


def test_eager_drops_the_compilation_config_and_kv_bytes_override_the_fraction():
    cfg = _cfg("rollout.vllm.enforce_eager=true", "rollout.vllm.cudagraph_mode=FULL",
               "rollout.vllm.kv_cache_memory_bytes=1024")
    kw = _kwargs(cfg)
    assert kw["enforce_eager"] is True and "compilation_config" not in kw
    assert kw["kv_cache_memory_bytes"] == 1024 and "gpu_memory_utilization" not in kw


def test_cpu_needs_kv_cache_bytes_and_refuses_sleep_mode():
    with pytest.raises(ValueError, match="kv_cache_memory_bytes must be set on a CPU host"):
        _kwargs(_cfg(), on_gpu=False)
    with pytest.raises(ValueError, match="enable_sleep_mode=true needs a GPU"):
        _kwargs(_cfg("rollout.vllm.kv_cache_memory_bytes=1024", "rollout.vllm.enable_sleep_mode=true",
                     "cluster.colocate=true"), on_gpu=False)
    kw = _kwargs(_cfg("rollout.vllm.kv_cache_memory_bytes=1024"), on_gpu=False)
    assert kw["weight_transfer_config"] == {"backend": GLOO_BACKEND}   # vLLM's NCCL protocol over gloo


def test_launcher_ranks_use_the_external_launcher_and_files():
    local = _kwargs(_cfg("rollout.vllm.kv_cache_memory_bytes=1024"), on_gpu=False, local_updates=True)
    assert local["weight_transfer_config"] == {"backend": SHM_BACKEND}   # a script driving an engine itself
    kw = _kwargs(_cfg(), spmd=True)
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["weight_transfer_config"] == {"backend": SHM_BACKEND}


def test_transfer_backend_by_placement():
    assert transfer_backend(on_gpu=True, colocated=False) == "nccl"
    assert transfer_backend(on_gpu=True, colocated=True) == "ipc"
    assert transfer_backend(on_gpu=False, colocated=True) == GLOO_BACKEND
    assert transfer_backend(on_gpu=True, colocated=False, local=True) == SHM_BACKEND


def test_compilation_config_auto_is_empty():
    assert compilation_config(_cfg().rollout.vllm) == {}


def test_process_env_points_caches_into_one_directory(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    env = process_env("/c", in_process=True, threads=2)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["OMP_NUM_THREADS"] == "2"
    assert all(env[k].startswith("/c/") for k in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "VLLM_RPC_BASE_PATH"))
    assert process_env("/c", in_process=False, threads=1)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    # a first GPU run must see vLLM's memory and kernel-fallback warnings; CPU hosts only its errors
    assert process_env("/c", in_process=True, threads=1, on_gpu=True)["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert env["VLLM_LOGGING_LEVEL"] == "ERROR"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    assert process_env("/c", in_process=True, threads=1, on_gpu=True)["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_config_refuses_truncated_sampling_with_vllm():
    with pytest.raises(ConfigError, match="top_p=1 and rollout.top_k=-1"):
        _cfg("rollout.top_p=0.9")
    with pytest.raises(ConfigError, match="top_p=1 and rollout.top_k=-1"):
        _cfg("rollout.top_k=20")
    load_config("grpo_tiny", ["rollout.top_p=0.9"])   # the HF engine reports the untruncated log-probs


# ------------------------------------------------------------------ the update protocol (rollout.weights)
def _specs():
    return [ParamSpec("a", "float32", (2, 3)), ParamSpec("b", "float32", (3,))]


def test_check_manifest_names_what_differs():
    check_manifest(_specs(), _specs(), "engine 0")
    bad = [ParamSpec("a", "bfloat16", (2, 3)), ParamSpec("c", "float32", (3,))]
    with pytest.raises(WeightMismatch) as err:
        check_manifest(_specs(), bad, "engine 0")
    text = str(err.value)
    assert "missing [b]" in text and "not in the engine's model [c]" in text
    assert "a: sent bfloat16[2, 3], engine has float32[2, 3]" in text and "keeps its current weights" in text
    with pytest.raises(WeightMismatch, match="shape / dtype differs for .*b: sent float32\\[4\\]"):
        check_manifest(_specs(), [_specs()[0], ParamSpec("b", "float32", (4,))], "engine 0")


def test_session_checks_each_bucket_in_order_and_completion():
    session = UpdateSession(_specs(), _specs(), "step-1", "engine 0")
    session.accept([("a", torch.zeros(2, 3))])
    with pytest.raises(WeightMismatch, match="1 of 2 announced"):
        session.complete()
    with pytest.raises(WeightMismatch, match="arrived as 'b' float64"):
        session.accept([("b", torch.zeros(3, dtype=torch.float64))])
    session = UpdateSession(_specs(), _specs(), "step-1", "engine 0")
    with pytest.raises(WeightMismatch, match="announced as 'a'"):
        session.accept([("b", torch.zeros(3))])
    session = UpdateSession(_specs(), _specs(), "step-1", "engine 0")
    session.accept([("a", torch.zeros(2, 3)), ("b", torch.zeros(3))])
    session.complete()
    with pytest.raises(WeightMismatch, match="after the 2 announced"):
        session.accept([("b", torch.zeros(3))])


def test_expected_manifest_matches_the_model_it_describes():
    from transformers import AutoModelForCausalLM

    from rlhf_ds.models.tiny import resolve_model_path

    path = resolve_model_path("tiny:llama-micro")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert expected_manifest(path, torch.float32) == manifest_of(model.named_parameters())
    assert {p.dtype for p in expected_manifest(path, torch.bfloat16)} == {"bfloat16"}


# ------------------------------------------------------------------ GPU transfers (protocol, with fakes)
vllm_transfer = pytest.importorskip("rlhf_ds.rollout.vllm_transfer")


class _FakeActor:
    """weight_manifest / weight_buckets like the ActorWorker's, over a small module."""

    def __init__(self):
        self.module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        self.gathers = 0

    def weight_manifest(self):
        return [ParamSpec(n, "bfloat16", tuple(p.shape)) for n, p in self.module.named_parameters()]

    def weight_buckets(self, bucket_bytes, on_device=False):
        from rlhf_ds.engine.gather import size_bounded_buckets

        for bucket in size_bounded_buckets(list(self.module.named_parameters()), bucket_bytes):
            self.gathers += 1
            yield [(n, p.detach().to(torch.bfloat16)) for n, p in bucket]


def test_zero_weight_source_metadata_agrees_with_iteration():
    actor = _FakeActor()
    source = vllm_transfer.ZeroWeightSource(actor, bucket_bytes=16)
    meta = source.metadata()
    pairs = list(source)
    assert [(m.name, m.dtype, m.shape) for m in meta] == [(n, t.dtype, tuple(t.shape)) for n, t in pairs]
    assert [m.name for m in meta] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert actor.gathers == 3   # 12-byte weights, bucket of 16 bytes: gathered bucket by bucket
    # vLLM's sender checks each yielded tensor against the metadata it announced
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    assert len(list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))) == 4


def test_trainer_init_info_per_backend():
    info = vllm_transfer.trainer_init_info("nccl", 0, master_address="10.0.0.1", master_port=29600, world_size=5,
                                           bucket_bytes=1 << 20)
    assert (info.backend, info.is_sender, info.world_size, info.packed, info.packed_buffer_size_bytes) == \
        ("nccl", True, 5, True, 1 << 20)
    assert vllm_transfer.trainer_init_info("ipc", 1).is_sender is False
    gloo = vllm_transfer.trainer_init_info(GLOO_BACKEND, 0, master_address="127.0.0.1", master_port=1, world_size=3,
                                           bucket_bytes=4096)
    assert (gloo.backend, gloo.packed, gloo.packed_buffer_size_bytes) == (GLOO_BACKEND, True, 4096)
    with pytest.raises(ValueError, match="valid: nccl, ipc, rlhf_ds_gloo"):
        vllm_transfer.trainer_init_info("mpi", 0)


def test_nccl_ranks_of_several_engines():
    assert vllm_transfer.nccl_world_size(num_engines=2, tensor_parallel_size=4) == 9
    base = {"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 9}
    offsets = [vllm_transfer.engine_init_info(base, i, 4)["rank_offset"] for i in range(2)]
    assert offsets == [1, 5]   # engine 0's workers are NCCL ranks 1-4, engine 1's 5-8
    assert vllm_transfer.engine_init_info({"packed": False}, 1, 4) == {"packed": False}


def test_vllm_under_the_launcher_on_cpu_is_refused_at_start_up():
    from rlhf_ds.rollout.engines import rollout_engine_spec

    cfg = _cfg("rollout.vllm.kv_cache_memory_bytes=1024", "cluster.launcher=deepspeed")
    with pytest.raises(ValueError, match="external_launcher executor, which needs a GPU.*cluster.launcher=ray"):
        rollout_engine_spec(cfg)
