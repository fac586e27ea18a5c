"""What a resumed run may change: the checkpoint's config against the current one, before anything starts.

A change to a key that alters the run (model paths, data, batch shape, algorithm...) is refused with the
list of changed keys, unless ``trainer.allow_resume_changes`` names them. Harmless changes (run length,
logging, evaluation, deadlines, the learning rate, micro-batch sizes, which do not change the gradient)
are accepted and listed. A change of a role's rank count is refused with what to do instead: ZeRO-3
checkpoints are partitioned by rank.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import yaml

from rlhf_ds.config import Config, ConfigError
from rlhf_ds.trainer.checkpoint import CONFIG_FILE, latest_checkpoint

# Keys whose change a resumed run accepts: they do not change what the run computes, or (learning
# rates) the user means the change to take effect from the resumed step.
HARMLESS_PREFIXES = (
    "trainer.max_steps", "trainer.log_interval", "trainer.eval_interval", "trainer.save_interval",
    "trainer.keep_checkpoints", "trainer.resume", "trainer.allow_resume_changes", "trainer.skip_plan",
    "trainer.output_dir", "trainer.max_skipped_steps", "data.num_eval", "rollout.eval_temperature",
    "rollout.weight_sync_bucket_mb", "cluster.", "reward.num_workers", "reward.timeout_s",
    "reward.import_timeout_s", "reward.memory_limit_mb", "reward.cpu_time_limit_s", "actor.lr", "critic.lr",
    "actor.micro_batch_size", "critic.micro_batch_size", "reference.micro_batch_size", "reward.micro_batch_size",
    "trainer.eval_pass_k", "reward.correct_score", "rollout.vllm.", "trainer.loggers", "trainer.wandb_",
    # how the remote reward is reached, not what it pays (its url and weight are not here)
    "reward.remote.batch_size", "reward.remote.concurrency", "reward.remote.timeout_s", "reward.remote.retries",
    "reward.remote.backoff_s", "reward.remote.headers", "reward.remote.token",
)
RANK_KEYS = ("actor.num_ranks", "critic.num_ranks")   # of the roles whose checkpoints are resumed


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def changed_keys(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved value, current value) for every key that differs."""
    old, new = _flatten(saved), _flatten(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def check_resume(cfg: Config, log: Callable[[str], None] = print) -> Optional[str]:
    """Before a resumed run starts: the checkpoint it will resume, after checking what changed
    (raises ConfigError); None (and a message) when there is no checkpoint yet."""
    directory = latest_checkpoint(cfg.trainer.output_dir)
    if directory is None:
        log(f"trainer.resume=true: no complete checkpoint in {os.path.join(cfg.trainer.output_dir, 'checkpoints')} "
            f"yet: starting from step 0")
        return None
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    changes = changed_keys(saved, cfg.to_dict())
    ranks = {k: v for k, v in changes.items() if k in RANK_KEYS and k.split('.')[0] in cfg.trainable_roles}
    if ranks:
        listed = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in ranks.items())
        raise ConfigError(f"trainer.resume: {directory} was written with other rank counts ({listed}); ZeRO-3 "
                          f"checkpoints are partitioned by rank. Resume with the checkpoint's rank counts (the "
                          f"gradient does not depend on them), or convert it with DeepSpeed's universal "
                          f"checkpoint (deepspeed.checkpoint.ds_to_universal) and start a new run from it")
    allowed = set(cfg.trainer.allow_resume_changes)
    refused = {k: v for k, v in changes.items()
               if k not in allowed and not any(k == p or (p.endswith(".") and k.startswith(p))
                                               for p in HARMLESS_PREFIXES)}
    if refused:
        listed = "\n  ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"trainer.resume: these keys differ from the config of {directory} and change what the "
                          f"run computes:\n  {listed}\nchange them back, start a new trainer.output_dir, or allow "
                          f"them with trainer.allow_resume_changes=[{','.join(refused)}]")
    accepted = {k: v for k, v in changes.items() if k not in refused}
    if accepted:
        log("trainer.resume: accepted changes: " + ", ".join(f"{k}: {old!r} -> {new!r}"
                                                             for k, (old, new) in accepted.items()))
    return directory
