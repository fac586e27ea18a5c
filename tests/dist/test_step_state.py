"""Non-finite steps are skipped on every rank; checkpoints restore parameters and optimizer state
exactly and resume like an uninterrupted run; export gives an HF directory with identical logits."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import _jobs
import _reference as ref
from _launch import run_ranks
from rlhf_ds.models.tiny import resolve_model_path


@pytest.mark.dist
def test_skip_checkpoint_resume_export(tmp_path):
    lm_dir = resolve_model_path("tiny:llama-arith")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    exp1 = ref.fill_actor_fields(lm, ref.make_experience(lm.config.vocab_size, seed=0), seed=1)
    exp2 = ref.fill_actor_fields(lm, ref.make_experience(lm.config.vocab_size, seed=5), seed=6)
    out = run_ranks(_jobs.state_job, 2, lm_dir, str(tmp_path), exp1, exp2)[0]

    assert out["skip_metrics"]["skipped"].value == 1.0
    assert "grad_norm" not in out["skip_metrics"]
    assert out["unchanged_after_skip"], "a skipped step changed parameters or optimizer state on some rank"
    assert out["step1_metrics"]["skipped"].value == 0.0 and out["changed_after_step"]
    assert out["skip_left_no_trace"], "skip-then-step differs from a run that never saw the bad batch"

    assert out["client_state"] == {"rl_step": 7}
    assert out["params_restored"] and out["optimizer_restored"]
    assert out["resumed_step_matches"], "the step after resume differs from the uninterrupted step"

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    state = dict(exported.named_parameters())
    assert set(state) == set(out["params2"])
    assert all(torch.equal(state[k].detach(), v) for k, v in out["params2"].items())
    with torch.no_grad():
        logits = exported(input_ids=exp2.input_ids, attention_mask=exp2.attention_mask,
                          position_ids=exp2.position_ids).logits
    diff = (logits - out["logits"]).abs().max().item()
    print(f"\nexport round trip: max |logit difference| = {diff:.1e}")
    assert diff <= 1e-6
    assert AutoTokenizer.from_pretrained(tmp_path / "export").vocab_size == lm.config.vocab_size
