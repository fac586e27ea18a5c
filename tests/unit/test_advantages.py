"""Advantage estimators: hand-derived values, slow per-group loops vs the vectorised code, robustness."""
import math
import random

import pytest
import torch

from rlhf_ds.algo import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    discounted_returns,
    gae_advantages,
    group_baseline_advantages,
    kl_shaped_token_rewards,
    make_kl_controller,
    masked_whiten,
)

F64 = torch.float64


def _t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# ---- group estimators: hand-derived values ------------------------------------------------------------
# group 0: scores [1, 0, 0, 0]: mean 0.25, unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5
# group 1: [2, 2] (all equal) -> 0;  group 2: [3] (alone) -> 0
SCORES = _t([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 3.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 2])


def test_grpo_hand_values():
    adv, bad = group_baseline_advantages(SCORES, GROUPS, "grpo", eps=0.0)
    # (1 - 0.25) / 0.5 = 1.5;  (0 - 0.25) / 0.5 = -0.5
    torch.testing.assert_close(adv, _t([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0]))
    assert bad == 0


def test_grpo_eps_is_added_to_std():
    adv, _ = group_baseline_advantages(SCORES, GROUPS, "grpo", eps=0.5)
    # 0.75 / (0.5 + 0.5) = 0.75
    assert adv[0].item() == pytest.approx(0.75)


def test_grpo_no_std_hand_values():
    adv, _ = group_baseline_advantages(SCORES, GROUPS, "grpo_no_std")
    torch.testing.assert_close(adv, _t([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0]))


def test_rloo_hand_values():
    adv, _ = group_baseline_advantages(SCORES, GROUPS, "rloo")
    # 1 - mean(0, 0, 0) = 1;  0 - mean(1, 0, 0) = -1/3
    torch.testing.assert_close(adv, _t([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("mode", ["grpo", "grpo_no_std", "rloo"])
def test_all_equal_groups_are_exactly_zero(mode):
    # 0.1 is not representable: a float mean of [0.1] * 3 differs from 0.1, yet the advantage is 0.
    scores = torch.full((3,), 0.1, dtype=torch.float32)
    adv, _ = group_baseline_advantages(scores, torch.zeros(3, dtype=torch.long), mode)
    assert (adv == 0).all()


@pytest.mark.parametrize("mode", ["grpo", "grpo_no_std", "rloo"])
def test_nonfinite_scores_are_masked_and_counted(mode):
    # group 0 finite members [1, 0]: mean 0.5, unbiased std sqrt(0.5)
    scores = _t([1.0, math.nan, 0.0, math.inf, -math.inf])
    adv, bad = group_baseline_advantages(scores, torch.tensor([0, 0, 0, 0, 1]), mode, eps=0.0)
    expected = {"grpo": 0.5 / math.sqrt(0.5), "grpo_no_std": 0.5, "rloo": 1.0}[mode]
    torch.testing.assert_close(adv, _t([expected, 0.0, -expected, 0.0, 0.0]))
    assert bad == 3


def _slow_group_advantages(scores, group_ids, mode, eps):
    """Reference: one python loop per group, statistics from the definitions."""
    out = [0.0] * len(scores)
    for gid in set(group_ids):
        rows = [i for i, g in enumerate(group_ids) if g == gid and math.isfinite(scores[i])]
        values = [scores[i] for i in rows]
        if len(set(values)) <= 1:
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        for i in rows:
            others = [scores[j] for j in rows if j != i]
            if mode == "grpo":
                out[i] = (scores[i] - mean) / (std + eps)
            elif mode == "grpo_no_std":
                out[i] = scores[i] - mean
            else:
                out[i] = scores[i] - sum(others) / len(others)
    return out


@pytest.mark.parametrize("mode", ["grpo", "grpo_no_std", "rloo"])
@pytest.mark.parametrize("seed", range(5))
def test_vectorised_group_estimators_match_slow_loop(mode, seed):
    rng = random.Random(seed)
    group_ids, scores = [], []
    for gid in rng.sample(range(100), 8):  # ids neither dense nor sorted
        size = rng.choice([1, 2, 3, 5, 8])
        kind = rng.random()
        for _ in range(size):
            group_ids.append(gid)
            if kind < 0.2:
                scores.append(1.0)  # an all-equal group
            elif rng.random() < 0.1:
                scores.append(rng.choice([math.nan, math.inf]))
            else:
                scores.append(float(rng.randint(0, 1)) if kind < 0.6 else rng.gauss(0.0, 2.0))
    order = list(range(len(scores)))
    rng.shuffle(order)  # rows of a group need not be adjacent here
    group_ids = [group_ids[i] for i in order]
    scores = [scores[i] for i in order]
    adv, bad = group_baseline_advantages(_t(scores), torch.tensor(group_ids), mode, eps=1e-6)
    torch.testing.assert_close(adv, _t(_slow_group_advantages(scores, group_ids, mode, 1e-6)))
    assert bad == sum(not math.isfinite(s) for s in scores)


# ---- float64 statistics: rewards whose float32 statistics lose the answer ---------------------------------
def test_grpo_of_huge_float32_rewards_matches_hand_values():
    # float32 squares of deviations near 1e20 overflow to inf: std inf made every advantage 0.
    # Scale-free: [1e20, 0, 0, 0] gives the advantages of [1, 0, 0, 0], i.e. 1.5, -0.5 (test_grpo_hand_values).
    scores = torch.tensor([1e20, 0.0, 0.0, 0.0], dtype=torch.float32)
    adv, bad = group_baseline_advantages(scores, torch.zeros(4, dtype=torch.long), "grpo", eps=0.0)
    assert adv.dtype == torch.float32 and bad == 0
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_grpo_keeps_differences_a_float32_group_mean_rounds_off():
    # 1e7 + [0, 1, 2, 3] is exact in float32 (below 2**24), but their float32 sum 4e7 + 6 is not (spacing 4
    # there), so a float32 mean is off by 0.5 and one member got advantage 0. In float64 the centred
    # scores are [-1.5, -0.5, 0.5, 1.5], unbiased var 5/3.
    scores = torch.tensor([1e7, 1e7 + 1, 1e7 + 2, 1e7 + 3], dtype=torch.float32)
    assert scores.tolist() == [1e7, 1e7 + 1, 1e7 + 2, 1e7 + 3]
    adv, _ = group_baseline_advantages(scores, torch.zeros(4, dtype=torch.long), "grpo", eps=0.0)
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 3)
    torch.testing.assert_close(adv, expected)
    assert (adv != 0).all() and (adv.diff() > 0).all()
    out = compute_advantages("grpo", scores, torch.ones(4, 2), torch.zeros(4, dtype=torch.long), eps=0.0)
    assert out.advantages.dtype == torch.float32
    torch.testing.assert_close(out.advantages, expected.unsqueeze(1).expand(4, 2))


def test_whitening_of_huge_float32_values():
    # mean 3e20, deviations +-2e20 whose float32 squares overflow; std 2e20 -> -1, 0, 1
    values = torch.tensor([[1e20, 3e20], [5e20, 7.0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = masked_whiten(values, mask, eps=0.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_every_estimator_gives_huge_float32_rewards_the_advantages_of_small_ones(estimator):
    # every estimator is linear in the scores up to its whitening, so 1e20 * r whitens like r
    small = torch.tensor([1.0, 0.0, 0.0, 0.5], dtype=torch.float32)
    mask, groups = torch.ones(4, 3), torch.tensor([0, 0, 1, 1])
    outs = [compute_advantages(estimator, s, mask, groups, values=torch.zeros(4, 3), whiten=True, eps=0.0)
            for s in (small, small * 1e20)]
    assert outs[1].advantages.dtype == torch.float32 and (outs[1].advantages != 0).any()
    torch.testing.assert_close(outs[1].advantages, outs[0].advantages)


# ---- token rewards, returns, whitening ------------------------------------------------------------------
def test_kl_shaped_token_rewards_hand_values():
    mask = _t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    kl = _t([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0], [9.0, 9.0, 9.0]])
    rewards = kl_shaped_token_rewards(_t([1.0, 2.0, 5.0]), mask, kl, kl_coef=0.5)
    # row 0: -0.05, -0.1, 1 - 0.15;  row 1: 2 - 0.2 on its only token;  row 2 (empty): nothing
    torch.testing.assert_close(rewards, _t([[-0.05, -0.1, 0.85], [1.8, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_discounted_returns_hand_values():
    rewards = _t([[-0.05, -0.1, 0.85], [1.8, 0.0, 0.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    # gamma 0.5: G_2 = 0.85; G_1 = -0.1 + 0.425 = 0.325; G_0 = -0.05 + 0.1625 = 0.1125
    torch.testing.assert_close(
        discounted_returns(rewards, mask, 0.5), _t([[0.1125, 0.325, 0.85], [1.8, 0.0, 0.0]])
    )


def test_masked_whiten_hand_values():
    values = _t([[1.0, 3.0, 100.0], [5.0, -7.0, -7.0]])
    mask = _t([[1, 1, 0], [1, 0, 0]])
    # tokens 1, 3, 5: mean 3, unbiased var (4 + 0 + 4) / 2 = 4 -> std 2
    out = masked_whiten(values, mask, eps=0.0)
    torch.testing.assert_close(out, _t([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    scaled_only = masked_whiten(values, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(scaled_only, _t([[0.5, 1.5, 0.0], [2.5, 0.0, 0.0]]))
    assert (masked_whiten(values, torch.zeros_like(mask)) == 0).all()


def test_reinforce_pp_hand_values():
    # one token per row, scores 1 and -1: returns +-1, mean 0, unbiased var 2 -> +-1/sqrt(2)
    out = compute_advantages("reinforce_pp", _t([1.0, -1.0]), _t([[1, 0], [1, 0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(out.advantages, _t([[2**-0.5, 0.0], [-(2**-0.5), 0.0]]), atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(out.returns, _t([[1.0, 0.0], [-1.0, 0.0]]))


def test_reinforce_pp_baseline_is_group_centering_then_whitening():
    scores = _t([1.0, 0.0, 0.0, 3.0, 1.0, math.nan])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = _t([[1, 1, 0]] * 3 + [[1, 1, 1], [1, 0, 0], [1, 1, 1]])
    kl = torch.linspace(0.0, 0.5, 18, dtype=F64).reshape(6, 3)
    out = compute_advantages("reinforce_pp_baseline", scores, mask, groups, kl=kl, kl_coef=0.1, gamma=0.9)
    # group 0 mean 1/3; group 1 finite members [3, 1], mean 2; row 5 (NaN) dropped everywhere
    centered = _t([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0])
    keep = mask * _t([1, 1, 1, 1, 1, 0]).unsqueeze(1)
    returns = discounted_returns(kl_shaped_token_rewards(centered, keep, kl, 0.1), keep, 0.9)
    torch.testing.assert_close(out.returns, returns)
    torch.testing.assert_close(out.advantages, masked_whiten(returns, keep))
    assert out.num_nonfinite == 1
    assert (out.advantages[5] == 0).all()
    kept = out.advantages[keep.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-6)


# ---- GAE ---------------------------------------------------------------------------------------------------
def test_gae_hand_values():
    rewards = _t([[0.0, 1.0, 0.0]])
    values = _t([[0.5, 0.4, 9.0]])  # the 9.0 sits on padding and must be ignored
    mask = _t([[1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_1 = 1 - 0.4 = 0.6 (no value after the last token); A_1 = 0.6
    # delta_0 = 0.9 * 0.4 - 0.5 = -0.14; A_0 = -0.14 + 0.9 * 0.8 * 0.6 = 0.292
    torch.testing.assert_close(adv, _t([[0.292, 0.6, 0.0]]))
    torch.testing.assert_close(ret, _t([[0.792, 1.0, 0.0]]))


def _slow_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, one row and one step at a time."""
    out = torch.zeros_like(rewards)
    for i, n in enumerate(lengths):
        v = [values[i, t].item() for t in range(n)] + [0.0]
        deltas = [rewards[i, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            out[i, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_slow_loop(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 0, 3, 1, 4]
    mask = _t([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    rewards = torch.randn(5, 5, generator=gen, dtype=F64) * mask
    values = torch.randn(5, 5, generator=gen, dtype=F64)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    expected = _slow_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)


def test_gae_through_compute_advantages_uses_kl_shaped_rewards():
    mask = _t([[1, 1, 0], [1, 1, 1]])
    values = _t([[0.5, 0.4, 0.0], [0.1, 0.2, 0.3]])
    kl = _t([[0.2, 0.4, 0.0], [0.0, 0.0, 1.0]])
    out = compute_advantages(
        "gae", _t([1.0, 0.0]), mask, torch.tensor([0, 1]), values=values, kl=kl, kl_coef=0.5, gamma=0.9, lam=0.8
    )
    rewards = _t([[-0.1, 0.8, 0.0], [0.0, 0.0, -0.5]])
    expected = _slow_gae(rewards, values, [2, 3], 0.9, 0.8)
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(out.returns, (expected + values) * mask)


# ---- compute_advantages -----------------------------------------------------------------------------------
def test_group_estimators_broadcast_over_tokens_and_respect_mask():
    mask = _t([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]])
    out = compute_advantages("grpo_no_std", _t([1.0, 0.0, 0.5, 7.0]), mask, torch.tensor([0, 0, 0, 1]))
    # group 0 mean 0.5 (the empty row's score still counts): +0.5, -0.5, 0; group 1 alone: 0
    torch.testing.assert_close(out.advantages, _t([[0.5, 0.5, 0.0], [0.0] * 3, [0.0] * 3, [0.0] * 3]))
    torch.testing.assert_close(out.returns, out.advantages)


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_every_estimator_is_finite_with_bad_rows_and_constant_groups(estimator):
    scores = _t([1.0, 1.0, math.nan, 0.0, 1.0, math.inf])
    mask = _t([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]])
    out = compute_advantages(
        estimator, scores, mask, torch.tensor([0, 0, 1, 1, 2, 2]), values=torch.zeros(6, 3, dtype=F64), whiten=True
    )
    assert torch.isfinite(out.advantages).all() and torch.isfinite(out.returns).all()
    assert out.num_nonfinite == 2
    assert (out.advantages[[2, 5]] == 0).all() and (out.advantages[mask == 0] == 0).all()


def test_compute_advantages_errors():
    mask, groups = torch.ones(2, 2), torch.tensor([0, 0])
    with pytest.raises(ValueError) as err:
        compute_advantages("ppo", torch.ones(2), mask, groups)
    assert all(name in str(err.value) for name in ADVANTAGE_ESTIMATORS)
    # KL in the reward of an estimator without token rewards: refused by the config (the one place),
    # tests/unit/test_config.py::test_kl_in_reward_needs_token_rewards
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", torch.ones(2), mask, groups)


# ---- KL controllers ---------------------------------------------------------------------------------------
def test_adaptive_kl_controller_hand_values_and_resume():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error 9/6 - 1 = 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1
    expected = 0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000)
    assert ctl.value == pytest.approx(expected)
    resumed = make_kl_controller(0.1, adaptive=True, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    with pytest.raises(ValueError, match="adaptive"):
        FixedKLController(0.1).load_state_dict(ctl.state_dict())


def test_fixed_kl_controller_never_moves():
    ctl = make_kl_controller(0.05, adaptive=False)
    ctl.update(100.0, 1000)
    assert isinstance(ctl, FixedKLController) and ctl.value == 0.05
    ctl.load_state_dict({"kind": "fixed", "value": 0.3})  # the config's coefficient wins
    assert ctl.value == 0.05
    with pytest.raises(ValueError, match="kl_horizon"):
        make_kl_controller(0.05, adaptive=True, target=1.0, horizon=0)



@pytest.mark.parametrize("bad_kl", [math.nan, math.inf, -math.inf, torch.tensor(math.nan)])
@pytest.mark.parametrize("adaptive", [True, False])
def test_kl_controllers_refuse_a_nonfinite_kl_and_keep_their_coefficient(bad_kl, adaptive):
    ctl = make_kl_controller(0.1, adaptive=adaptive, target=6.0, horizon=10000)
    with pytest.raises(ValueError, match="current_kl must be a finite number"):
        ctl.update(current_kl=bad_kl, n_steps=256)
    assert ctl.value == 0.1
    ctl.update(current_kl=9.0, n_steps=256)  # still usable afterwards
    assert math.isfinite(ctl.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5])
def test_adaptive_kl_controller_refuses_a_bad_checkpointed_coefficient(value):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    with pytest.raises(ValueError, match="finite and >= 0"):
        ctl.load_state_dict({"kind": "adaptive", "value": value})
    assert ctl.value == 0.1
