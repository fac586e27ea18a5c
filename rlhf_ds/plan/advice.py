"""The config changes that would make a run fit, each one planned again, ranked by what it costs.

Candidates are tried on the roles of the devices that do not fit: a smaller micro-batch, gradient
checkpointing, optimizer offload, parameter offload, more ranks, colocation off, more rollout engines,
a smaller vLLM KV budget. A candidate that the config validator refuses (a micro-batch that no longer
divides the mini-batch...) is dropped. When no single change fits, the changes are combined greedily,
each time taking the one that cuts the total shortfall most; the result fits, or is the closest found.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf_ds.choices import TRAINABLE_ROLES, Stage
from rlhf_ds.config import Config, ConfigError, config_from_dict
from rlhf_ds.plan.planner import Plan, Target, plan_run

OFFLOAD_OPTIMIZER = "ds_configs/zero3_offload_optimizer.json"
OFFLOAD_ALL = "ds_configs/zero3_offload_all.json"
MAX_COMBINED = 4


@dataclass(frozen=True)
class Change:
    overrides: tuple[str, ...]       # key=value, as `rlhf-ds train` takes them
    cost: str                        # what the change costs, in a few words
    rank: int                        # lower is cheaper


@dataclass(frozen=True)
class Fix:
    changes: tuple[Change, ...]
    plan: Plan

    @property
    def overrides(self) -> list[str]:
        """Every key once, at its last value (a combination may double a count twice)."""
        final: dict[str, str] = {}
        for change in self.changes:
            for override in change.overrides:
                key, value = override.split("=", 1)
                final[key] = value
        return [f"{key}={value}" for key, value in final.items()]

    @property
    def cost(self) -> str:
        return "; ".join(dict.fromkeys(change.cost for change in self.changes))


def _role_changes(cfg: Config, role: str) -> list[Change]:
    role_cfg = getattr(cfg, role)
    out = []
    if role_cfg.micro_batch_size > 1:
        out.append(Change((f"{role}.micro_batch_size={role_cfg.micro_batch_size // 2}",),
                          "more, smaller forward/backward passes; the same gradient", 0))
    if role in TRAINABLE_ROLES:
        if not role_cfg.gradient_checkpointing:
            out.append(Change((f"{role}.gradient_checkpointing=true",), "~30 % more training compute", 1))
        if "offload" not in role_cfg.ds_config:
            out.append(Change((f"{role}.ds_config={OFFLOAD_OPTIMIZER}",),
                              "optimizer step on the CPU; needs host memory", 2))
        if not role_cfg.ds_config.endswith("offload_all.json"):
            out.append(Change((f"{role}.ds_config={OFFLOAD_ALL}",),
                              "parameters stream from host memory every pass (slowest)", 4))
    out.append(Change((f"{role}.num_ranks={role_cfg.num_ranks * 2}",), f"more devices for {role}", 3))
    return out


def _rollout_changes(cfg: Config) -> list[Change]:
    rollout, out = cfg.rollout, []
    if rollout.backend == "vllm":
        budget = rollout.vllm.kv_cache_memory_bytes
        if budget:
            out.append(Change((f"rollout.vllm.kv_cache_memory_bytes={budget // 2}",),
                              "fewer sequences decoded at once", 1))
        else:
            out.append(Change((f"rollout.vllm.gpu_memory_utilization={round(rollout.vllm.gpu_memory_utilization / 2, 3)}",),
                              "fewer sequences decoded at once", 1))
    out.append(Change((f"rollout.num_engines={rollout.num_engines * 2}",), "more rollout devices", 3))
    return out


def candidate_changes(cfg: Config, plan: Plan) -> list[Change]:
    roles = sorted({role for device in plan.failing() for role in device.roles()})
    out: list[Change] = []
    for role in roles:
        out += _rollout_changes(cfg) if role == "rollout" else _role_changes(cfg, role)
    if cfg.cluster.colocate and plan.target.on_gpu:
        out.append(Change(("cluster.colocate=false",), "actor, reference and rollout on separate devices", 3))
    return out


def _apply(cfg: Config, overrides: list[str], stage: Stage) -> Config | None:
    try:
        return config_from_dict(cfg.to_dict(), overrides, stage)
    except ConfigError:
        return None


def _total_shortfall(plan: Plan) -> int:
    return sum(device.shortfall for device in plan.devices)


def suggest_fixes(cfg: Config, plan: Plan, target: Target, limit: int = 5, stage: Stage = "rl") -> list[Fix]:
    """Up to ``limit`` single changes that make the run (its ``stage``) fit, cheapest first. When none does
    alone, one greedy combination: it fits, or it is the closest found (its plan says what is still short);
    empty when no change helps at all."""
    tried: list[tuple[Change, Plan]] = []
    for change in candidate_changes(cfg, plan):
        changed = _apply(cfg, list(change.overrides), stage)
        if changed is not None:
            tried.append((change, plan_run(changed, target, stage)))
    fits = sorted((t for t in tried if t[1].fits), key=lambda t: (t[0].rank, t[1].worst_shortfall))
    if fits:
        return [Fix((change,), new_plan) for change, new_plan in fits[:limit]]
    return _combined(cfg, plan, target, stage)


def _combined(cfg: Config, plan: Plan, target: Target, stage: Stage) -> list[Fix]:
    """Greedy: each round, the change that cuts the total shortfall most (the cheaper one on a tie)."""
    chosen: list[Change] = []
    current_cfg, current = cfg, plan
    for _ in range(MAX_COMBINED):
        best = None
        for change in candidate_changes(current_cfg, current):
            changed = _apply(current_cfg, list(change.overrides), stage)
            if changed is None:
                continue
            new_plan = plan_run(changed, target, stage)
            key = (_total_shortfall(new_plan), change.rank)
            if key[0] < _total_shortfall(current) and (best is None or key < best[0]):
                best = (key, change, changed, new_plan)
        if best is None:
            break
        chosen.append(best[1])
        current_cfg, current = best[2], best[3]
        if current.fits:
            break
    return [Fix(tuple(chosen), current)] if chosen else []
