"""Per-token losses: hand-derived values and gradients, homogeneity, GSPO vs its paper form, entropy memory."""
import math

import pytest
import torch

from rlhf_ds.algo import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    POLICY_STAT_KINDS,
    entropy_from_logits,
    get_policy_loss,
    kl_penalty,
    metrics_from_stats,
    policy_loss,
    scale_advantages,
    truncated_is_weights,
    value_loss,
)
from rlhf_ds.choices import POLICY_LOSS_HOMOGENEOUS

F64 = torch.float64
CLIP = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)


def _t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# ---- PPO ----------------------------------------------------------------------------------------------------
def test_ppo_hand_values_and_gradients():
    # old log-probs 0, so the ratio r is exp(logprobs); clip range [0.8, 1.28], dual clip 3
    ratios = _t([[1.5, 0.5, 0.5, 5.0, 2.0]])
    advantages = _t([[1.0, 1.0, -1.0, -1.0, -1.0]])
    logprobs = ratios.log().requires_grad_()
    loss, stats = policy_loss("ppo", logprobs, torch.zeros_like(ratios), advantages, torch.ones_like(ratios), **CLIP)
    # 1: A>0, r above 1.28: max(-1.5, -1.28) = -1.28 (clipped, no gradient)
    # 2: A>0, r below: max(-0.5, -0.8) = -0.5 (unclipped, d/dlogp = -A r = -0.5)
    # 3: A<0, r below 0.8: max(0.5, 0.8) = 0.8 (clipped, no gradient)
    # 4: A<0, r = 5: max(5, 1.28) = 5, dual cap -3A = 3 -> 3 (no gradient)
    # 5: A<0, r = 2: max(2, 1.28) = 2 < 3 (unclipped, d/dlogp = -A r = 2)
    torch.testing.assert_close(loss, _t([[-1.28, -0.5, 0.8, 3.0, 2.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, _t([[0.0, -0.5, 0.0, 0.0, 2.0]]))
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 5)
    assert stats["ratio_max"].item() == pytest.approx(5.0)
    assert stats["ratio_mean"].item() == pytest.approx(9.5 / 5)


def test_ppo_without_dual_clip_and_masked_stats():
    ratios = _t([[5.0, 1.0, 7.0]])
    mask = _t([[1, 1, 0]])
    loss, stats = policy_loss(
        "ppo", ratios.log(), torch.zeros(1, 3, dtype=F64), _t([[-1.0, 2.0, 1.0]]), mask,
        clip_low=0.2, clip_high=0.2, dual_clip=0.0,
    )
    # token 1: max(5, 1.2) = 5 (no cap);  token 2: r = 1 -> -2
    torch.testing.assert_close(loss[:, :2], _t([[5.0, -2.0]]))
    assert stats["ratio_max"].item() == pytest.approx(5.0)  # the padded 7 is not seen
    assert stats["dual_clip_frac"].item() == 0.0


def test_stats_have_declared_kinds():
    _, stats = policy_loss("ppo", torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2, 2), **CLIP)
    metrics = metrics_from_stats(stats, POLICY_STAT_KINDS)
    assert set(metrics) == set(POLICY_STAT_KINDS)
    assert metrics["approx_kl"].value == 0.0


@pytest.mark.parametrize("name", sorted(name for name, flag in POLICY_LOSS_HOMOGENEOUS.items() if flag))
def test_policy_losses_are_positively_homogeneous_in_the_advantage(name):
    """The property advantage pre-scaling relies on: loss(c A) = c loss(A) for c >= 0, values and grads.

    Run for every loss the choices table flags homogeneous, so each flag is proven on its function."""
    gen = torch.Generator().manual_seed(1)
    logprobs = (torch.randn(4, 6, generator=gen, dtype=F64) * 0.5).requires_grad_()
    old = torch.randn(4, 6, generator=gen, dtype=F64) * 0.5
    adv = torch.randn(4, 6, generator=gen, dtype=F64)
    mask = (torch.rand(4, 6, generator=gen) > 0.2).to(F64)
    base, _ = policy_loss(name, logprobs, old, adv, mask, **CLIP)
    (base_grad,) = torch.autograd.grad((base * mask).sum(), logprobs)
    for scale in (0.0, 0.3, 7.0):
        scaled, _ = policy_loss(name, logprobs, old, adv * scale, mask, **CLIP)
        (grad,) = torch.autograd.grad((scaled * mask).sum(), logprobs)
        torch.testing.assert_close(scaled * mask, base * mask * scale)
        torch.testing.assert_close(grad, base_grad * scale)


def test_importance_weights_multiply_the_loss_without_gradient():
    logprobs = _t([[0.1, -0.2]]).requires_grad_()
    is_w = _t([[0.5, 2.0]]).requires_grad_()
    args = (logprobs, torch.zeros(1, 2, dtype=F64), _t([[1.0, -1.0]]), torch.ones(1, 2))
    plain, _ = policy_loss("ppo", *args, **CLIP)
    weighted, _ = policy_loss("ppo", *args, **CLIP, is_weights=is_w)
    torch.testing.assert_close(weighted, plain * is_w.detach())
    weighted.sum().backward()
    assert is_w.grad is None


# ---- GSPO ---------------------------------------------------------------------------------------------------
def test_gspo_hand_values_and_gradients():
    # one sequence, token log-ratios 0.2 and -0.1 (third token is padding): s = exp(0.05)
    old = torch.zeros(1, 3, dtype=F64)
    logprobs = _t([[0.2, -0.1, 5.0]]).requires_grad_()
    mask = _t([[1, 1, 0]])
    adv = torch.ones(1, 3, dtype=F64)
    loss, _ = policy_loss("gspo", logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=0.0)
    s = math.exp(0.05)
    torch.testing.assert_close(loss[:, :2], _t([[-s, -s]]))
    (loss * mask).sum().backward()
    # token form: d/dlogp_t = -A s for every token of the sequence
    torch.testing.assert_close(logprobs.grad, _t([[-s, -s, 0.0]]))
    # clip_high 0.01: s > 1.01, the whole sequence is clipped
    clipped, stats = policy_loss("gspo", logprobs, old, adv, mask, clip_low=0.2, clip_high=0.01, dual_clip=0.0)
    torch.testing.assert_close(clipped[:, :2], _t([[-1.01, -1.01]]))
    assert stats["clip_frac_high"].item() == 1.0


def test_gspo_with_sequence_mean_is_the_paper_objective():
    """J = (1/B) sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log-ratio) differentiated directly."""
    gen = torch.Generator().manual_seed(2)
    lengths = [4, 1, 3, 2]
    mask = _t([[1.0] * n + [0.0] * (4 - n) for n in lengths])
    logprobs = (torch.randn(4, 4, generator=gen, dtype=F64) * 0.05).requires_grad_()
    old = torch.randn(4, 4, generator=gen, dtype=F64) * 0.05
    seq_adv = _t([1.0, -2.0, 0.5, -0.3])
    clip = 0.04
    paper = 0.0
    for i, n in enumerate(lengths):
        s_i = torch.exp((logprobs[i, :n] - old[i, :n]).mean())
        paper = paper - torch.minimum(s_i * seq_adv[i], s_i.clamp(1 - clip, 1 + clip) * seq_adv[i]) / len(lengths)
    (paper_grad,) = torch.autograd.grad(paper, logprobs)
    scaled, _ = scale_advantages(seq_adv.unsqueeze(1) * mask, mask, "sequence_mean")
    loss, stats = policy_loss("gspo", logprobs, old, scaled, mask, clip_low=clip, clip_high=clip, dual_clip=0.0)
    (grad,) = torch.autograd.grad((loss * mask).sum(), logprobs)
    assert 0 < stats["clip_frac"].item() < 1  # both branches are exercised
    torch.testing.assert_close((loss * mask).sum(), paper)
    torch.testing.assert_close(grad, paper_grad)


# ---- registry -------------------------------------------------------------------------------------------------
def test_unknown_policy_loss_lists_choices():
    with pytest.raises(ValueError) as err:
        get_policy_loss("dpo")
    assert all(name in str(err.value) for name in POLICY_LOSSES)


# A loss that is not homogeneous, and bad clip settings, are refused by the config (the one place):
# tests/unit/test_config.py (test_loss_reduction_refused_for_non_homogeneous_loss, test_bounds,
# test_dual_clip_is_zero_or_above_one).


# ---- value loss -----------------------------------------------------------------------------------------------
def test_value_loss_hand_values():
    values = _t([1.5, 1.1, 0.5])
    old = _t([1.0, 1.0, 1.0])
    returns = _t([2.0, 2.0, 0.0])
    # 1: (1.5-2)^2 = 0.25, clipped V 1.2 -> 0.64 -> 0.5 * 0.64 = 0.32
    # 2: inside the clip range: 0.5 * 0.81 = 0.405
    # 3: 0.25 vs clipped V 0.8 -> 0.64 -> 0.32
    torch.testing.assert_close(value_loss(values, old, returns, 0.2), _t([0.32, 0.405, 0.32]))
    torch.testing.assert_close(value_loss(values, old, returns, 0.0), _t([0.125, 0.405, 0.125]))


# ---- KL estimators --------------------------------------------------------------------------------------------
def test_kl_estimators_hand_values():
    x = math.log(2.0)  # logprobs - ref_logprobs
    logprobs, ref = _t([x, 0.0]), _t([0.0, 0.0])
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), _t([x, 0.0]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"), _t([x * x / 2, 0.0]))
    # k3 = exp(-x) + x - 1 = 0.5 + ln 2 - 1
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"), _t([0.5 + x - 1, 0.0]))


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    """E_{v ~ pi}[k(log pi_v - log ref_v)] = KL(pi || ref), computed exactly over a small vocabulary."""
    gen = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(6, generator=gen, dtype=F64), 0)
    logref = torch.log_softmax(torch.randn(6, generator=gen, dtype=F64), 0)
    exact = (logp.exp() * (logp - logref)).sum()
    for estimator in ("k1", "k3"):
        expectation = (logp.exp() * kl_penalty(logp, logref, estimator)).sum()
        torch.testing.assert_close(expectation, exact)


def test_k3_is_numerically_safe():
    logprobs = _t([-1000.0, 1000.0, 0.0]).requires_grad_()
    kl = kl_penalty(logprobs, torch.zeros(3, dtype=F64), "k3")
    kl.sum().backward()
    assert torch.isfinite(kl).all() and (kl >= 0).all() and torch.isfinite(logprobs.grad).all()
    half = kl_penalty(logprobs.detach().half(), torch.zeros(3, dtype=torch.half), "k3")
    assert not torch.isnan(half).any()


def test_unknown_kl_estimator_lists_choices():
    with pytest.raises(ValueError) as err:
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")
    assert all(name in str(err.value) for name in KL_ESTIMATORS)


# ---- truncated importance sampling ----------------------------------------------------------------------------
def test_truncated_is_weights_hand_values():
    old = _t([[math.log(0.5), math.log(3.0), 0.0, 1000.0, 0.3]]).requires_grad_()
    rollout = torch.zeros(1, 5, dtype=F64)
    mask = _t([[1, 1, 1, 1, 0]])
    weights = truncated_is_weights(old, rollout, cap=2.0, response_mask=mask)
    # 0.5; 3 capped at 2; 1; exp(1000) capped without overflow; padding 0
    torch.testing.assert_close(weights, _t([[0.5, 2.0, 1.0, 2.0, 0.0]]))
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="tis_cap"):
        truncated_is_weights(old, rollout, cap=0.0)


# ---- entropy ------------------------------------------------------------------------------------------------
def _naive_entropy(logits):
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (2, 3, 2, 5), (2, 9, 5)])
@pytest.mark.parametrize("chunk", [1, 4, 6, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_entropy_matches_naive_values_and_gradients(shape, chunk, dtype):
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(shape, generator=gen, dtype=dtype) * 3).requires_grad_()
    upstream = torch.randn(shape[:-1], generator=gen, dtype=dtype)
    ent = entropy_from_logits(logits, chunk=chunk)
    (grad,) = torch.autograd.grad((ent * upstream).sum(), logits)
    ref = _naive_entropy(logits)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), logits)
    torch.testing.assert_close(ent, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_entropy_of_a_non_contiguous_slice():
    """Logits of response tokens are a slice of the full sequence's logits."""
    full = torch.randn(3, 10, 6, dtype=F64, requires_grad=True)
    response = full[:, 4:9]
    ent = entropy_from_logits(response, chunk=3)
    ent.sum().backward()
    torch.testing.assert_close(ent, _naive_entropy(response.detach()))
    assert (full.grad[:, :4] == 0).all() and (full.grad[:, 9:] == 0).all()
    uniform = entropy_from_logits(torch.zeros(2, 6))
    torch.testing.assert_close(uniform, torch.full((2,), math.log(6)))


def test_entropy_saves_no_second_vocab_sized_tensor():
    """The autograd graph keeps only the logits; the naive version also keeps softmax [B, T, V]."""

    def saved_numel(fn, logits):
        sizes = []

        def pack(tensor):
            if tensor.data_ptr() != logits.data_ptr():
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits)
        return sum(sizes)

    logits = torch.randn(4, 16, 100, requires_grad=True)
    assert saved_numel(lambda x: entropy_from_logits(x, chunk=8), logits) == 0
    assert saved_numel(_naive_entropy, logits) >= logits.numel()  # the control: naive saves p
