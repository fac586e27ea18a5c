"""The RL math of rlhf_ds: pure functions over tensors (no ray, deepspeed, vllm or config imports).

See DESIGN.md, "The loss and gradient contract": advantages are computed per rollout batch
(``compute_advantages``), pre-scaled once per mini-batch for the loss reduction mode
(``scale_advantages``), and every per-token loss is then reduced by a masked / weighted sum.
"""
from rlhf_ds.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    TOKEN_REWARD_ESTIMATORS,
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
    KL_ESTIMATORS,
    POLICY_LOSSES,
    POLICY_STAT_KINDS,
    PolicyLossSpec,
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
from rlhf_ds.algo.reduction import LOSS_REDUCTIONS, scale_advantages, token_weights

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
    "PolicyLossSpec",
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
]
