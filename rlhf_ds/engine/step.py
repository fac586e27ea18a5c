"""One optimizer step per mini-batch, with the gradient of the global objective (sum semantics).

DeepSpeed's defaults average: ``engine.backward`` divides each micro-batch loss by the accumulation
steps, and ZeRO's reduce-scatter divides by the data-parallel world size. The loss functions here return
*masked sums* whose weights were normalised once for the whole mini-batch (``algo.token_weights``), so
we backward ``local_sum * dp_size`` with ``scale_wrt_gas=False``: the reduce-scatter's 1/dp then cancels
and the optimizer sees exactly d(global objective)/d(params), for any dp and any micro-batch size.

Non-finite steps: ZeRO-3 in bf16 / fp32 has no loss scaler to skip a bad step for us, and a rank that
skipped alone would desynchronise the replicas. A non-finite loss on any rank, or a non-finite global
gradient norm, makes every rank drop the gradients without touching parameters or optimizer state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rlhf_ds.algo.metrics import Metric, MetricKind, reduce_metrics_across_microbatches
from rlhf_ds.engine import dist
from rlhf_ds.engine.metrics_comm import all_reduce_metrics

# loss_fn(micro_batch) -> (masked-sum loss of this micro-batch [scalar tensor], metrics of it)
LossFn = Callable[[Any], tuple[torch.Tensor, dict]]


class NonFiniteStepError(RuntimeError):
    """Raised after too many consecutive skipped (non-finite) optimizer steps."""


@dataclass
class SkipCounter:
    """Counts skipped steps; ``max_consecutive`` skips in a row abort the run (0 = never abort)."""
    max_consecutive: int = 3
    consecutive: int = 0
    total: int = 0

    def record(self, skipped: bool, role: str = "") -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteStepError(
                f"{role or 'engine'}: {self.consecutive} consecutive optimizer steps skipped for a non-finite "
                f"loss or gradient norm (trainer.max_skipped_steps={self.max_consecutive}); lower the learning "
                f"rate, check the rewards and advantages for inf/nan, or raise trainer.max_skipped_steps")


def discard_gradients(engine: Any) -> None:
    """Drop the accumulated gradients exactly as ZeRO-3 does after an overflowed step: parameters and
    optimizer state stay as they are. Collective (all ranks)."""
    optimizer = engine.optimizer
    optimizer._pre_step()
    optimizer._partition_all_parameters()
    optimizer._overflow_clean_up(optimizer.loss_scale)


def _is_finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float32)).all())


def accumulate_gradients(engine: Any, micro_batches: Sequence[Any], loss_fn: LossFn, *, role: str = ""
                         ) -> tuple[dict[str, Metric], bool]:
    """Forward/backward every micro-batch of this rank's shard with sum semantics; no optimizer step.

    Returns (this rank's metrics reduced over its micro-batches, whether any local loss was non-finite).
    After it, ``deepspeed.utils.safe_get_full_grad`` reads d(global objective)/d(param) on every rank.
    All ranks must call it together; shards may hold different numbers of micro-batches.
    """
    if not micro_batches:
        raise ValueError(f"{role}: got an empty shard; every rank needs at least one sequence")
    # ZeRO-3 gathers parameters collectively in every forward/backward: all ranks run the same count.
    # A rank with fewer micro-batches repeats its last one with zero weight.
    dp_size = dist.dp_size()
    num_passes = dist.max_over_ranks(len(micro_batches))
    per_micro, bad_loss = [], False
    for index in range(num_passes):
        real = index < len(micro_batches)
        engine.set_gradient_accumulation_boundary(index == num_passes - 1)
        loss_sum, metrics = loss_fn(micro_batches[min(index, len(micro_batches) - 1)])
        if real:
            bad_loss |= not _is_finite(loss_sum.detach())
            per_micro.append(metrics)
        engine.backward(loss_sum * (float(dp_size) if real else 0.0), scale_wrt_gas=False)
    return reduce_metrics_across_microbatches(per_micro), bad_loss


def sum_gradient_step(engine: Any, micro_batches: Sequence[Any], loss_fn: LossFn, *, skips: SkipCounter,
                      role: str = "") -> dict[str, Metric]:
    """Accumulate the gradient of this rank's shard, then one optimizer step on every rank, or a skip
    on every rank.

    Returns the mini-batch metrics combined over ranks, plus ``grad_norm`` (MAX, the pre-clipping global
    norm; absent on a skipped step), ``skipped`` (MAX, 1.0 when the step was skipped) and ``lr`` (MAX).
    Raises NonFiniteStepError after ``skips.max_consecutive`` skips in a row.
    """
    local, bad_loss = accumulate_gradients(engine, micro_batches, loss_fn, role=role)
    metrics = all_reduce_metrics(local)
    skipped = dist.any_rank(bad_loss)
    if skipped:
        discard_gradients(engine)
    else:
        engine.step()
        # ZeRO-3 refuses a non-finite global norm itself; every rank sees the same all-reduced norm.
        skipped = not engine.was_step_applied()
        if not skipped:
            metrics["grad_norm"] = Metric(float(engine.get_global_grad_norm()), MetricKind.MAX)
    metrics["skipped"] = Metric(1.0 if skipped else 0.0, MetricKind.MAX)
    metrics["lr"] = Metric(float(engine.get_lr()[0]), MetricKind.MAX)
    skips.record(skipped, role)
    return metrics
