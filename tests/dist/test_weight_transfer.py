"""What vLLM's engines receive through the packed NCCL protocol is, bit for bit, the ZeRO-3 actor's weights.

Two actor ranks hold every parameter partitioned; each sync gathers them bucket by bucket on both ranks
(``ZeroWeightSource`` over ``iter_full_param_buckets(to_cpu=False)``), actor rank 0 packs and broadcasts
them with vLLM's trainer engine, and two engines (transfer ranks 1 and 2, placed by ``engine_init_info``)
unpack them with vLLM's worker engine. Gloo and host streams stand in for NCCL and CUDA streams."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import _reference as ref
import _transfer_jobs
from _launch import free_port, run_ranks
from rlhf_ds.models.tiny import resolve_model_path

BUCKET_BYTES = 64 << 10
pytestmark = pytest.mark.gpu_path


@pytest.mark.dist
def test_engines_receive_the_actor_weights_bitwise_through_the_packed_sender(tmp_path):
    model_dir = resolve_model_path("tiny:llama-arith")
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    exp = ref.fill_actor_fields(lm, ref.make_experience(lm.config.vocab_size))
    ds_config = _transfer_jobs.gather_all_template(str(tmp_path))
    out = run_ranks(_transfer_jobs.transfer_job, 2, model_dir, str(tmp_path), ds_config, free_port(),
                    BUCKET_BYTES, exp)[0]
    layout = out["partitioned"]
    assert layout["partitioned"] == layout["parameters"] > 0   # every parameter lives in 2 partitions
    names = [name for name, _, _ in out["manifest"]]
    sizes = [torch.Size(shape).numel() * 4 for _, _, shape in out["manifest"]]   # float32 on CPU
    total_bytes, largest = sum(sizes), max(sizes)
    assert out["client_calls"] == ["init"] + ["start", "update", "finish"] * 2   # one rendezvous, two syncs
    first, second = out["rounds"]
    assert not all(torch.equal(first["actor"][n], second["actor"][n]) for n in names)   # the step moved them
    for round_ in out["rounds"]:
        for engine, (received, chunks) in enumerate(zip(round_["engines"], round_["chunks"], strict=True)):
            assert [name for name, _ in received] == names, engine          # the manifest's order, each once
            for name, tensor in received:
                assert torch.equal(tensor, round_["actor"][name]), (engine, name)   # bit for bit
            # packed buffers of the bucket's size: one closes as soon as it holds more than the bucket
            assert sum(chunks) == total_bytes and len(chunks) > 1
            assert all(c > BUCKET_BYTES for c in chunks[:-1]) and all(c <= BUCKET_BYTES + largest for c in chunks)
