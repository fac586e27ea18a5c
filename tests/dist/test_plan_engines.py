"""The planner's model-state bytes per rank equal what built ZeRO-3 engines hold: parameter partitions
and optimizer states (fp32 master + Adam moments), for 1 and 2 ranks, with and without optimizer offload,
for the actor (causal LM) and the critic (value model); and the optimizer DeepSpeed built is the one the
merged config asks for."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import _jobs
import _reference as ref
from _launch import run_ranks
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.plan.memory import model_state_bytes
from rlhf_ds.plan.shapes import model_shape

TEMPLATES = ["ds_configs/zero3_train.json", "ds_configs/zero3_offload_optimizer.json"]


@pytest.mark.dist
@pytest.mark.parametrize("ranks", [1, 2])
def test_planned_model_states_equal_what_engines_hold(tmp_path, ranks):
    lm_dir = resolve_model_path("tiny:llama-arith")
    value_dir = resolve_model_path("tiny:llama-arith-value")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    exp = ref.make_experience(lm.config.vocab_size)
    actor_exp, critic_exp = ref.fill_actor_fields(lm, exp), ref.fill_critic_fields(exp)
    results = run_ranks(_jobs.plan_job, ranks, lm_dir, value_dir, str(tmp_path), actor_exp, critic_exp, TEMPLATES)
    for role, path in (("actor", "tiny:llama-arith"), ("critic", "tiny:llama-arith-value")):
        # fp32 on CPU: 4 bytes per parameter element
        planned = model_state_bytes(model_shape(path, value_head=role == "critic"), ranks, 4, trainable=True)
        for template in TEMPLATES:
            for rank, held in enumerate(results):
                got = held[(template, role)]
                assert got["moment tensors"] == 2 * got["master tensors"], (template, role)  # m and v exist
                assert got["parameters"] == planned["parameters"], (template, role, rank)
                assert got["optimizer states"] == planned["optimizer states"], (template, role, rank)
                # on CPU: torch's AdamW (no fused-Adam compile), DeepSpeed's CPU Adam when offloaded
                assert got["optimizer"] == ("DeepSpeedCPUAdam" if "offload" in template else "AdamW")
