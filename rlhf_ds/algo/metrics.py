"""Training metrics reduced by a declared kind, never by a name suffix.

A metric is produced together with its kind:

* ``SUM``  — a partial sum whose pieces add up to the mini-batch value. The per-piece loss is one:
  advantages and token weights are pre-scaled for the whole mini-batch (``algo.reduction``), so the
  masked sums of all micro-batches on all ranks add up to the mini-batch objective.
* ``MEAN`` — a statistic of one piece (a clip fraction, a mean ratio); pieces are averaged.
* ``MAX`` / ``MIN`` — extremes, combined with max / min.

Three reductions, in the order the trainer applies them:

1. ``reduce_metrics_across_microbatches`` on one rank (SUM summed, MEAN averaged, MAX max, MIN min);
2. ``combine_rank_metrics`` over data-parallel ranks: the same rule, as a pure function over the
   per-rank dicts (the collective that gathers them lives with the engine);
3. ``reduce_metrics_across_minibatches`` averages every metric over the optimizer steps of one
   training step; the normalisation already happened inside each mini-batch, so summing here would
   inflate the reported loss by the number of mini-batches.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Union

import torch


class MetricKind(enum.Enum):
    SUM = "sum"
    MEAN = "mean"
    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class Metric:
    value: float
    kind: MetricKind


MetricLike = Union[Metric, tuple]
MetricDict = Mapping[str, MetricLike]


def as_metric(name: str, metric: MetricLike) -> Metric:
    """Normalise a ``Metric`` or a ``(value, kind)`` tuple (tensor values become floats)."""
    if isinstance(metric, Metric):
        value, kind = metric.value, metric.kind
    elif isinstance(metric, tuple) and len(metric) == 2:
        value, kind = metric
    else:
        raise TypeError(f"metric {name!r}: expected Metric or (value, MetricKind), got {metric!r}")
    if isinstance(kind, str):
        kind = MetricKind(kind)
    if not isinstance(kind, MetricKind):
        raise TypeError(f"metric {name!r}: kind must be one of {[k.name for k in MetricKind]}, got {kind!r}")
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    return Metric(float(value), kind)


def metrics_from_stats(stats: Mapping[str, object], kinds: Mapping[str, MetricKind]) -> dict[str, Metric]:
    """Attach declared kinds to a dict of scalar stats (tensors or floats).

    ``kinds`` is the declaration published next to the function that produced ``stats``
    (e.g. ``algo.losses.POLICY_STAT_KINDS``); a stat without a declared kind is an error.
    """
    missing = sorted(set(stats) - set(kinds))
    if missing:
        raise KeyError(f"stats {missing} have no declared MetricKind (declared: {sorted(kinds)})")
    return {name: as_metric(name, (value, kinds[name])) for name, value in stats.items()}


def _group_by_name(dicts: Iterable[MetricDict]) -> dict[str, tuple[MetricKind, list[float]]]:
    grouped: dict[str, tuple[MetricKind, list[float]]] = {}
    for metrics in dicts:
        for name, raw in metrics.items():
            metric = as_metric(name, raw)
            if name not in grouped:
                grouped[name] = (metric.kind, [])
            kind, values = grouped[name]
            if kind is not metric.kind:
                raise ValueError(f"metric {name!r} is reported with mixed kinds {kind.name} and {metric.kind.name}")
            values.append(metric.value)
    return grouped


def _reduce(kind: MetricKind, values: list[float]) -> float:
    if kind is MetricKind.SUM:
        return math.fsum(values)
    if kind is MetricKind.MEAN:
        return math.fsum(values) / len(values)
    if kind is MetricKind.MAX:
        return max(values)
    return min(values)


def _reduce_by_kind(dicts: Iterable[MetricDict]) -> dict[str, Metric]:
    return {name: Metric(_reduce(kind, values), kind) for name, (kind, values) in _group_by_name(dicts).items()}


def reduce_metrics_across_microbatches(per_micro: list[MetricDict]) -> dict[str, Metric]:
    """One rank's micro-batches -> one dict: SUM summed, MEAN averaged, MAX max, MIN min.

    A name missing from some micro-batches is reduced over the ones that report it.
    Raises ValueError when a name arrives with two different kinds.
    """
    return _reduce_by_kind(per_micro)


def combine_rank_metrics(per_rank: list[MetricDict]) -> dict[str, Metric]:
    """Pure form of the data-parallel all-reduce: SUM summed, MEAN averaged, MAX max, MIN min."""
    return _reduce_by_kind(per_rank)


def reduce_metrics_across_minibatches(per_minibatch: list[MetricDict]) -> dict[str, float]:
    """Optimizer steps of one training step -> plain floats: every metric is averaged.

    Kinds are still checked for consistency; MAX / MIN become the mean of the per-step extremes.
    """
    return {
        name: math.fsum(values) / len(values) for name, (_, values) in _group_by_name(per_minibatch).items()
    }
