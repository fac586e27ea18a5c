"""Metric reduction by declared kind (docs/design.md#metrics-reduced-by-kind)."""
import pytest
import torch

from rlhf_ds.algo import (
    Metric,
    MetricKind,
    combine_rank_metrics,
    metrics_from_stats,
    reduce_metrics_across_microbatches,
    reduce_metrics_across_minibatches,
    scale_advantages,
)

SUM, MEAN, MAX, MIN = MetricKind.SUM, MetricKind.MEAN, MetricKind.MAX, MetricKind.MIN


def test_micro_batch_reduction_per_kind():
    def micro(loss, clip_frac, ratio_max, ratio_min):
        return {
            "loss": Metric(loss, SUM),
            "clip_frac": Metric(clip_frac, MEAN),
            "ratio_max": Metric(ratio_max, MAX),
            "ratio_min": Metric(ratio_min, MIN),
        }

    per_micro = [micro(1.0, 0.2, 1.5, 0.9), micro(2.5, 0.4, 3.0, 0.7), micro(-0.5, 0.0, 2.0, 0.8)]
    out = reduce_metrics_across_microbatches(per_micro)
    assert out["loss"] == Metric(3.0, SUM)  # 1 + 2.5 - 0.5
    assert out["clip_frac"].kind is MEAN and out["clip_frac"].value == pytest.approx(0.2)  # (0.2 + 0.4 + 0) / 3
    assert out["ratio_max"] == Metric(3.0, MAX)
    assert out["ratio_min"] == Metric(0.7, MIN)


def test_rank_combination_per_kind():
    per_rank = [
        {"loss": Metric(1.0, SUM), "kl": Metric(0.1, MEAN), "len_max": Metric(7.0, MAX), "len_min": Metric(2.0, MIN)},
        {"loss": Metric(3.0, SUM), "kl": Metric(0.3, MEAN), "len_max": Metric(5.0, MAX), "len_min": Metric(0.0, MIN)},
    ]
    out = combine_rank_metrics(per_rank)
    assert out == {
        "loss": Metric(4.0, SUM),
        "kl": Metric(pytest.approx(0.2), MEAN),
        "len_max": Metric(7.0, MAX),
        "len_min": Metric(0.0, MIN),
    }


def test_minibatch_reduction_averages_everything():
    out = reduce_metrics_across_minibatches(
        [
            {"loss": Metric(1.0, SUM), "len_max": Metric(4.0, MAX)},
            {"loss": Metric(3.0, SUM), "len_max": Metric(8.0, MAX)},
        ]
    )
    assert out == {"loss": 2.0, "len_max": 6.0}


def test_sum_kind_loss_reports_the_mini_batch_mean_not_a_multiple():
    """Worked example: 2 mini-batches x 2 ranks x 2 micro-batches of a token-mean loss.

    Each piece reports its masked sum of pre-scaled token losses (SUM kind). Summed over micro-batches
    and ranks it is the mini-batch's token mean; averaged over mini-batches it is the mean of those.
    """
    gen = torch.Generator().manual_seed(0)
    minibatch_means, reports = [], []
    for _ in range(2):
        lengths = torch.tensor([4, 1, 3, 0, 2, 4, 1, 3])
        mask = (torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)).double()
        token_loss = torch.rand(8, 4, generator=gen, dtype=torch.float64) * 10
        _, weights = scale_advantages(torch.zeros_like(mask), mask, "token_mean")
        minibatch_means.append((token_loss * mask).sum().item() / mask.sum().item())
        per_rank = []
        for rank_rows in (range(0, 4), range(4, 8)):
            per_micro = [
                {"loss": Metric((token_loss[rows] * weights[rows]).sum().item(), SUM)}
                for rows in (list(rank_rows)[:2], list(rank_rows)[2:])
            ]
            per_rank.append(reduce_metrics_across_microbatches(per_micro))
        reports.append(combine_rank_metrics(per_rank))
        assert reports[-1]["loss"].value == pytest.approx(minibatch_means[-1])
    reported = reduce_metrics_across_minibatches(reports)["loss"]
    assert reported == pytest.approx(sum(minibatch_means) / 2)
    assert reported != pytest.approx(sum(minibatch_means))  # what summing would report


def test_mixed_kinds_for_one_name_is_an_error():
    bad = [{"loss": Metric(1.0, SUM)}, {"loss": Metric(1.0, MEAN)}]
    for reducer in (reduce_metrics_across_microbatches, combine_rank_metrics, reduce_metrics_across_minibatches):
        with pytest.raises(ValueError, match="loss"):
            reducer(bad)


def test_tuples_tensors_and_missing_names():
    out = reduce_metrics_across_microbatches(
        [{"loss": (torch.tensor(1.5), SUM), "frac": (0.5, "mean")}, {"loss": Metric(0.5, SUM)}]
    )
    assert out == {"loss": Metric(2.0, SUM), "frac": Metric(0.5, MEAN)}  # frac reduced over the dict holding it
    with pytest.raises(TypeError, match="loss"):
        reduce_metrics_across_microbatches([{"loss": 1.0}])  # a kind is required, never guessed


def test_metrics_from_stats_needs_a_declared_kind():
    metrics = metrics_from_stats({"a": torch.tensor(0.25), "b": 3}, {"a": MEAN, "b": MAX})
    assert metrics == {"a": Metric(0.25, MEAN), "b": Metric(3.0, MAX)}
    with pytest.raises(KeyError, match="c"):
        metrics_from_stats({"c": 1.0}, {"a": MEAN})
