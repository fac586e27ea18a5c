"""The on-policy update (one epoch, one mini-batch, no reference) skips the separate old-log-prob pass:
its loss takes the old log-probs from the training forward. The gradient must be the one the separate
pass gives, and the rollout / trainer gap must still be reported."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ds.algo import token_weights
from rlhf_ds.config import load_config
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.rollout.base import RolloutSample, build_experience
from rlhf_ds.workers.actor import actor_loss
from rlhf_ds.workers.common import policy_logprobs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:llama-micro"))


def _experience(temperature: float):
    gen = torch.Generator().manual_seed(1)
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 5], [1, 6]]
    samples = []
    for i in range(len(prompts)):
        for _ in range(2):
            length = int(torch.randint(2, 7, (1,), generator=gen))
            response = torch.randint(4, 20, (length,), generator=gen).tolist()
            samples.append(RolloutSample(i, response, [-1.0] * length))
    exp = build_experience(prompts, samples, pad_id=0, max_prompt_len=8, max_response_len=8)
    advantages = torch.randn(len(exp), 1, generator=gen).expand(-1, exp.response_len) * exp.response_mask
    weights = token_weights(exp.response_mask, "token_mean", group_ids=exp.group_ids, micro_batch_size=8,
                            loss_norm_len=8)
    return exp.replace(advantages=advantages.contiguous(), token_weights=weights)


def _grads(model, exp, algo, temperature):
    model.zero_grad(set_to_none=True)
    loss, metrics = actor_loss(model, exp, algo, kl_coef=0.0, temperature=temperature, device=torch.device("cpu"))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, metrics


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("overrides", [[], ["algo.tis=true", "algo.tis_cap=1.5"], ["algo.dual_clip=3.0"]])
def test_training_forward_old_logprobs_give_the_separate_pass_gradient(model, temperature, overrides):
    cfg = load_config("grpo_tiny", overrides)
    assert cfg.on_policy_update
    exp = _experience(temperature)
    separate = policy_logprobs(model, exp, micro_batch_size=3, temperature=temperature, device=torch.device("cpu"))
    # a rollout engine a little off the trainer, so the TIS weights are not all 1
    exp = exp.replace(rollout_logprobs=(separate + 0.05 * torch.randn_like(separate)) * exp.response_mask)
    with_pass, m_pass = _grads(model, exp.replace(old_logprobs=separate), cfg.algo, temperature)
    skipped, m_skip = _grads(model, exp, cfg.algo, temperature)
    assert with_pass.keys() == skipped.keys() and with_pass
    for name in with_pass:
        torch.testing.assert_close(skipped[name], with_pass[name], rtol=1e-5, atol=1e-7, msg=name)
    assert m_skip["policy_loss"].value == pytest.approx(m_pass["policy_loss"].value, rel=1e-5, abs=1e-8)
    # the skipped path still measures the engine / trainer gap (here the 0.05-sigma noise)
    tokens = exp.response_mask.sum().item()
    gap = ((separate - exp.rollout_logprobs).abs() * exp.response_mask).sum().item()
    assert m_skip["rollout_gap_tokens"].value == tokens
    assert m_skip["rollout_gap_sum"].value == pytest.approx(gap, rel=1e-4)


def test_on_policy_update_only_when_exact():
    assert load_config("grpo_tiny").on_policy_update                          # 32 x 8 = 256 = mini-batch
    assert not load_config("grpo_tiny", ["algo.epochs=2"]).on_policy_update
    assert not load_config("grpo_tiny", ["algo.mini_batch_size=128"]).on_policy_update
    assert not load_config("grpo_tiny", ["algo.kl_placement=loss", "algo.kl_coef=0.1",
                                         "reference.model_path=tiny:llama-arith"]).on_policy_update
