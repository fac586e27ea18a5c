"""Data-parallel combine of metric dicts: the collective around ``algo.metrics.combine_rank_metrics``.

Ranks may report different names (a rank whose shard had no clipped token...), so the dicts travel
whole with ``all_gather_object`` (a few floats each) and the pure rule combines them: SUM summed, MEAN
averaged, MAX max, MIN min. Every rank gets the same result.
"""
from __future__ import annotations

import torch.distributed as torch_dist

from rlhf_ds.algo.metrics import Metric, MetricDict, as_metric, combine_rank_metrics
from rlhf_ds.engine import dist


def all_reduce_metrics(metrics: MetricDict) -> dict[str, Metric]:
    """This rank's metrics -> the metrics of all data-parallel ranks combined by kind."""
    local = {name: as_metric(name, m) for name, m in metrics.items()}
    if dist.dp_size() == 1:
        return combine_rank_metrics([local])
    gathered: list = [None] * dist.dp_size()
    plain = {name: (m.value, m.kind.value) for name, m in local.items()}
    torch_dist.all_gather_object(gathered, plain)
    return combine_rank_metrics(gathered)
