"""scale_advantages / token_weights / weighted_advantages: hand-derived weights for every mode, edge cases,
errors."""
import pytest
import torch

from rlhf_ds.algo import LOSS_REDUCTIONS, scale_advantages, token_weights, weighted_advantages

# Four rows of lengths 3, 1, 0 (empty response) and 2; R = 3.
# N = 6 tokens, B = 4 rows; groups {0, 1} (4 tokens) and {2, 3} (2 tokens).
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.float64)
GROUPS = torch.tensor([0, 0, 1, 1])


def _rows(*per_row):
    """Expand one weight per row onto MASK."""
    return MASK * torch.tensor(per_row, dtype=torch.float64).unsqueeze(1)


HAND_WEIGHTS = {
    # 1 / N = 1/6 on every token
    ("token_mean", None): _rows(1 / 6, 1 / 6, 1 / 6, 1 / 6),
    # micro 2: chunks {0,1} (N_0 = 4) and {2,3} (N_1 = 2), K = 2 -> 1/8 and 1/4
    ("token_mean_legacy", 2): _rows(1 / 8, 1 / 8, 1 / 4, 1 / 4),
    # micro 3: chunks {0,1,2} (4 tokens) and {3} (2 tokens), K = 2 -> 1/8, 1/4
    ("token_mean_legacy", 3): _rows(1 / 8, 1 / 8, 1 / 8, 1 / 4),
    # micro 1: K = 4 chunks of one row: 1/(4*3), 1/(4*1), empty, 1/(4*2)
    ("token_mean_legacy", 1): _rows(1 / 12, 1 / 4, 0.0, 1 / 8),
    # B * n_i: 1/(4*3), 1/(4*1), (empty: 0), 1/(4*2)
    ("sequence_mean", None): _rows(1 / 12, 1 / 4, 0.0, 1 / 8),
    # B * L with L = 5: 1/20 everywhere
    ("seq_mean_token_sum_norm", None): _rows(1 / 20, 1 / 20, 1 / 20, 1 / 20),
    # P * N_p: P = 2, N_0 = 4 -> 1/8; N_1 = 2 -> 1/4
    ("prompt_mean", None): _rows(1 / 8, 1 / 8, 1 / 4, 1 / 4),
}


@pytest.mark.parametrize("mode,micro", list(HAND_WEIGHTS))
def test_hand_derived_weights(mode, micro):
    weights = token_weights(MASK, mode, group_ids=GROUPS, micro_batch_size=micro, loss_norm_len=5)
    torch.testing.assert_close(weights, HAND_WEIGHTS[(mode, micro)], rtol=0, atol=1e-15)


@pytest.mark.parametrize("mode", LOSS_REDUCTIONS)
def test_scaled_advantages_are_advantages_times_weights_and_zero_on_padding(mode):
    advantages = torch.tensor([[1.0, -2.0, 3.0], [0.5, 7.0, 7.0], [9.0, 9.0, 9.0], [-1.0, 4.0, torch.inf]])
    scaled, weights = scale_advantages(
        advantages, MASK.float(), mode, group_ids=GROUPS, micro_batch_size=2, loss_norm_len=5
    )
    assert scaled.dtype == torch.float32 and weights.dtype == torch.float32
    expected = torch.where(MASK.bool(), advantages * weights, torch.zeros(()))
    torch.testing.assert_close(scaled, expected)
    assert torch.isfinite(scaled).all()
    assert (weights[MASK == 0] == 0).all()


def test_weighted_advantages_by_hand_and_as_scale_advantages_does():
    advantages = torch.tensor([[2.0, -1.0, torch.nan], [torch.inf, 3.0, 5.0]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 0.25, 0.0], [0.0, 1.0, 0.125]], dtype=torch.float32)
    product = weighted_advantages(advantages, weights)
    # garbage under a zero weight (NaN, inf) gives 0, not NaN; the result keeps the advantages' dtype
    torch.testing.assert_close(product, torch.tensor([[1.0, -0.25, 0.0], [0.0, 3.0, 0.625]], dtype=torch.float64))
    finite = torch.tensor([[2.0, -1.0, 4.0], [0.5, 3.0, 6.0]])
    scaled, token_w = scale_advantages(finite, MASK[:2], "sequence_mean")
    torch.testing.assert_close(scaled, weighted_advantages(finite, token_w), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        weighted_advantages(advantages, weights[:, :2])


def test_weight_totals():
    """token_mean weights sum to 1; sequence_mean to (non-empty rows) / B; prompt_mean to 1."""
    assert token_weights(MASK, "token_mean").sum().item() == pytest.approx(1.0)
    assert token_weights(MASK, "sequence_mean").sum().item() == pytest.approx(3 / 4)
    assert token_weights(MASK, "prompt_mean", group_ids=GROUPS).sum().item() == pytest.approx(1.0)
    # Dr. GRPO: total tokens / (B * L) = 6 / 20
    assert token_weights(MASK, "seq_mean_token_sum_norm", loss_norm_len=5).sum().item() == pytest.approx(0.3)


def test_group_ids_need_not_be_dense_or_sorted():
    dense = token_weights(MASK, "prompt_mean", group_ids=torch.tensor([0, 1, 0, 1]))
    sparse = token_weights(MASK, "prompt_mean", group_ids=torch.tensor([70, 3, 70, 3]))
    torch.testing.assert_close(dense, sparse)
    # group 70 = rows {0, 2}: 3 tokens -> 1/(2*3); group 3 = rows {1, 3}: 3 tokens -> 1/6
    torch.testing.assert_close(dense, _rows(1 / 6, 1 / 6, 1 / 6, 1 / 6))


@pytest.mark.parametrize("mode", LOSS_REDUCTIONS)
def test_all_empty_mini_batch_gives_zero_not_nan(mode):
    mask = torch.zeros(3, 4)
    scaled, weights = scale_advantages(
        torch.ones(3, 4), mask, mode, group_ids=torch.tensor([0, 0, 1]), micro_batch_size=2, loss_norm_len=4
    )
    assert (weights == 0).all() and (scaled == 0).all()


def test_bool_mask_accepted():
    torch.testing.assert_close(token_weights(MASK.bool(), "token_mean"), HAND_WEIGHTS[("token_mean", None)].float())


def test_unknown_mode_lists_every_choice():
    with pytest.raises(ValueError) as err:
        token_weights(MASK, "token_sum")
    for mode in LOSS_REDUCTIONS:
        assert mode in str(err.value)


@pytest.mark.parametrize(
    "mode,kwargs,needle",
    [
        ("token_mean_legacy", {}, "micro_batch_size"),
        ("token_mean_legacy", {"micro_batch_size": 0}, "micro_batch_size"),
        ("prompt_mean", {}, "group_ids"),
        ("prompt_mean", {"group_ids": torch.tensor([0, 1])}, "group_ids"),
        ("seq_mean_token_sum_norm", {}, "loss_norm_len"),
    ],
)
def test_missing_mode_arguments_are_named(mode, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        token_weights(MASK, mode, **kwargs)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="shape"):
        scale_advantages(torch.ones(4, 2), MASK, "token_mean")


def test_algo_imports_no_heavy_packages_nor_config():
    """The import rule (docs/design.md#package-layers): the math is importable anywhere in milliseconds."""
    import subprocess
    import sys

    code = (
        "import sys, rlhf_ds.algo\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed', 'vllm', 'transformers')"
        " or m == 'rlhf_ds.config']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
