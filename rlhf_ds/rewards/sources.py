"""A run's rule-side reward: the rule functions (``RewardRunner``) and a remote endpoint (``RemoteReward``)
as one callable of the runner's contract, (prompts, responses, answers, finished) -> (scores, stats).

The remote score is one more weighted term: score = sum_f weight_f * score_f + remote.weight * remote.
Its failures count in ``failures`` / ``timeouts`` next to the functions' (requests for calls), and it
stops the run past ``reward.max_failure_fraction`` on its own, as one function does.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from rlhf_ds.rewards.remote import RemoteReward, remote_from_config
from rlhf_ds.rewards.runner import RewardRunner


class CombinedReward:
    """Rule functions (``rules``, may be None) plus ``remote_weight`` times a remote reward. The remote
    requests run on a thread while the functions run in their worker processes."""

    def __init__(self, rules: RewardRunner | None, remote: RemoteReward, remote_weight: float = 1.0):
        if not math.isfinite(remote_weight):
            raise ValueError(f"reward.remote.weight must be finite, got {remote_weight}")
        self.rules, self.remote, self.remote_weight = rules, remote, float(remote_weight)

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                 ) -> tuple[list[float], dict[str, float]]:
        """Scores [B] and stats: the runner's and the remote's (``remote_*``); ``failures`` and
        ``timeouts`` count both."""
        with ThreadPoolExecutor(1) as pool:   # on error, leaving the block waits for the remote's deadline
            remote = pool.submit(self.remote, prompts, responses, answers, finished)
            if self.rules is not None:
                scores, stats = self.rules(prompts, responses, answers, finished)
            else:
                scores, stats = [0.0] * len(prompts), {"failures": 0.0, "timeouts": 0.0}
            remote_scores, remote_stats = remote.result()
        stats = {**stats, **remote_stats}
        stats["failures"] += remote_stats["remote_failures"]
        stats["timeouts"] += remote_stats["remote_timeouts"]
        return [s + self.remote_weight * r for s, r in zip(scores, remote_scores, strict=True)], stats

    def close(self) -> None:
        if self.rules is not None:
            self.rules.close()
        self.remote.close()

    def __enter__(self) -> "CombinedReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def runner_from_config(reward) -> RewardRunner | CombinedReward | None:
    """The rule-side reward of a run's ``reward`` config section: its functions, plus ``reward.remote``
    when that has a url; None when there is neither. A remote endpoint is probed first (an empty batch),
    so one that is down stops the run here, before any engine starts. The caller closes the result
    (``close()`` or ``with``)."""
    remote = remote_from_config(reward)
    if remote is not None:
        remote.check()
    rules = None
    if reward.functions:
        rules = RewardRunner(list(reward.functions), list(reward.function_weights), reward.timeout_s,
                             reward.failure_value, reward.num_workers,
                             max_failure_fraction=reward.max_failure_fraction,
                             import_timeout_s=reward.import_timeout_s, memory_limit_mb=reward.memory_limit_mb,
                             cpu_time_limit_s=reward.cpu_time_limit_s)
    return rules if remote is None else CombinedReward(rules, remote, reward.remote.weight)
