"""Each role's micro-batched forward under ZeRO-3 (2 ranks) equals the plain model on the whole batch:
actor / reference log-probs at temperature, critic values, reward at the last token."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import _jobs
import _reference as ref
from _launch import run_ranks
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.models.value_model import ValueModel

TEMPERATURE = 0.7


def plain_expectations(lm_dir: str, value_dir: str, exp) -> dict:
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    value = ValueModel.from_pretrained(value_dir, dtype=torch.float32)
    with torch.no_grad():
        logp_all = torch.log_softmax(ref.response_logits(lm, exp).float() / TEMPERATURE, -1)
        logprobs = logp_all.gather(-1, exp.response_ids.unsqueeze(-1)).squeeze(-1)
        values = ref.response_logits(value, exp)
        full = value(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=exp.position_ids)
    # Last real token by hand: the prompt is left-padded to P, so it is P - 1 + response length.
    last = [exp.prompt_len - 1 + int(exp.response_mask[i].sum()) for i in range(len(exp))]
    scores = torch.stack([full[i, t] for i, t in enumerate(last)])
    return {"logprobs": logprobs, "values": values, "scores": scores}


@pytest.mark.dist
def test_role_forwards_match_plain_models(tmp_path):
    lm_dir = resolve_model_path("tiny:llama-arith")
    value_dir = str(tmp_path / "value")
    value = ValueModel.from_pretrained(resolve_model_path("tiny:llama-arith-value"))
    with torch.no_grad():
        value.value_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
        value.value_head.bias.fill_(0.25)
    value.save_pretrained(value_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    exp = ref.make_experience(lm.config.vocab_size, seed=4, num_rows=7)  # 7 rows: a short last micro-batch
    results = run_ranks(_jobs.forward_job, 2, lm_dir, value_dir, str(tmp_path / "run"), exp)
    want = plain_expectations(lm_dir, value_dir, exp)
    real = exp.response_mask.bool()   # padding positions carry no value (micro-batches are cut to their rows)
    for got in results:
        torch.testing.assert_close(got["actor"][real], want["logprobs"][real], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["reference"][real], want["logprobs"][real], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["critic"][real], want["values"][real], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["reward"], want["scores"], rtol=0, atol=1e-5)
        plain = dict(lm.named_parameters())
        assert set(got["plain_load"]) == set(plain)
        assert all(torch.equal(got["plain_load"][n], p.detach()) for n, p in plain.items())
    assert (tmp_path / "run" / "ds_config_reward.json").exists()
