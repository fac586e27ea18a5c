"""clean_model_scores: what a NaN / inf reward-model score does under reward.nonfinite_model_score."""
import math

import pytest
import torch

from rlhf_ds.choices import NONFINITE_SCORE_POLICIES
from rlhf_ds.data.scoring import clean_model_scores


def test_finite_scores_pass_through_under_every_policy():
    scores = torch.tensor([0.5, -1.0, 2.0])
    for policy in NONFINITE_SCORE_POLICIES:
        cleaned, metrics = clean_model_scores(scores, policy, failure_value=-9.0)
        assert torch.equal(cleaned, scores) and cleaned.dtype == scores.dtype
        assert metrics == {"reward/model_nonfinite": 0.0}


def test_failure_value_replaces_each_nonfinite_score_and_counts_them():
    scores = torch.tensor([0.5, math.nan, 2.0, math.inf, -math.inf], dtype=torch.bfloat16)
    cleaned, metrics = clean_model_scores(scores, "failure_value", failure_value=-1.0)
    assert cleaned.dtype == torch.bfloat16
    assert cleaned.tolist() == [0.5, -1.0, 2.0, -1.0, -1.0]
    assert metrics == {"reward/model_nonfinite": 3.0}
    assert math.isnan(scores[1].item())  # the input is not modified in place


def test_fail_policy_raises_on_one_nonfinite_score_naming_the_key():
    with pytest.raises(ValueError, match=r"reward\.nonfinite_model_score='fail'") as err:
        clean_model_scores(torch.tensor([0.5, math.nan, 2.0]), "fail", failure_value=0.0)
    assert "1 non-finite" in str(err.value) and "of 3" in str(err.value)


@pytest.mark.parametrize("policy", NONFINITE_SCORE_POLICIES)
@pytest.mark.parametrize("bad", [[math.nan], [math.nan, math.inf, -math.inf]])
def test_no_finite_score_in_a_step_always_raises(policy, bad):
    with pytest.raises(ValueError, match="the reward model produced no finite score in this step"):
        clean_model_scores(torch.tensor(bad), policy, failure_value=0.0)


def test_empty_step_and_unknown_policy():
    cleaned, metrics = clean_model_scores(torch.zeros(0), "fail", failure_value=0.0)
    assert cleaned.numel() == 0 and metrics == {"reward/model_nonfinite": 0.0}
    with pytest.raises(ValueError) as err:
        clean_model_scores(torch.ones(2), "skip", failure_value=0.0)
    assert "reward.nonfinite_model_score" in str(err.value)
    assert all(repr(policy) in str(err.value) for policy in NONFINITE_SCORE_POLICIES)
