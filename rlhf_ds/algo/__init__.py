"""The RL math of rlhf_ds: pure functions over tensors (no ray, deepspeed, vllm or config imports).

See docs/design.md#the-loss-and-gradient-contract: advantages are computed per rollout batch
(``compute_advantages``), weighted per token once per mini-batch for the loss reduction mode
(``token_weights``, ``weighted_advantages``; ``scale_advantages`` does both), and every per-token loss
is then reduced by a masked / weighted sum.

The choice lists re-exported here (``ADVANTAGE_ESTIMATORS``, ``TOKEN_REWARD_ESTIMATORS``,
``KL_ESTIMATORS``, ``LOSS_REDUCTIONS``) are declared in rlhf_ds/choices.py. Settings are validated once,
by the config; these functions check only their own arguments.
"""
from rlhf_ds.algo.advantages import (
    AdvantageOutput,
    compute_advantages,
    discounted_returns,
    gae_advantages,
    group_baseline_advantages,
    kl_shaped_token_rewards,
    masked_whiten,
)
from rlhf_ds.algo.entropy import entropy_from_logits
from rlhf_ds.algo.kl_controller import AdaptiveKLController, FixedKLController, make_kl_controller
from rlhf_ds.algo.losses import (
    POLICY_LOSSES,
    POLICY_STAT_KINDS,
    PolicyLossFn,
    get_policy_loss,
    gspo_policy_loss,
    kl_penalty,
    policy_loss,
    ppo_policy_loss,
    truncated_is_weights,
    value_loss,
)
from rlhf_ds.algo.metrics import (
    Metric,
    MetricKind,
    combine_rank_metrics,
    metrics_from_stats,
    reduce_metrics_across_microbatches,
    reduce_metrics_across_minibatches,
)
from rlhf_ds.algo.reduction import scale_advantages, token_weights, weighted_advantages
from rlhf_ds.choices import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_REDUCTIONS, TOKEN_REWARD_ESTIMATORS

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "TOKEN_REWARD_ESTIMATORS",
    "AdvantageOutput",
    "compute_advantages",
    "discounted_returns",
    "gae_advantages",
    "group_baseline_advantages",
    "kl_shaped_token_rewards",
    "masked_whiten",
    "entropy_from_logits",
    "AdaptiveKLController",
    "FixedKLController",
    "make_kl_controller",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "POLICY_STAT_KINDS",
    "PolicyLossFn",
    "get_policy_loss",
    "gspo_policy_loss",
    "kl_penalty",
    "policy_loss",
    "ppo_policy_loss",
    "truncated_is_weights",
    "value_loss",
    "Metric",
    "MetricKind",
    "combine_rank_metrics",
    "metrics_from_stats",
    "reduce_metrics_across_microbatches",
    "reduce_metrics_across_minibatches",
    "LOSS_REDUCTIONS",
    "scale_advantages",
    "token_weights",
    "weighted_advantages",
]
