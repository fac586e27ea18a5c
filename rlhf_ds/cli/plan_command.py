"""`rlhf-ds plan [CONFIG] [key=value ...]`: whether a run fits, before it is launched.

Without options it plans for this machine (its GPUs, else its host memory). ``--gpu-memory-gib`` plans
for GPUs of that size instead (a cluster seen from a laptop); nothing is downloaded or loaded: models are
built from their HF configs on the meta device.
"""
from __future__ import annotations

import argparse

from rlhf_ds.choices import STAGES
from rlhf_ds.cli.args import Command, add_config_arguments, config_from_args, split_config_args
from rlhf_ds.config import DEFAULT_RECIPE, ConfigError
from rlhf_ds.plan.advice import suggest_fixes
from rlhf_ds.plan.memory import GiB
from rlhf_ds.plan.planner import Target, host_memory_bytes, local_target, plan_run, role_lines
from rlhf_ds.plan.report import render
from rlhf_ds.plan.shapes import ShapeError


def _add(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="plan for GPUs with this much memory (default: this machine's GPU; none: CPU)")
    parser.add_argument("--host-memory-gib", type=float, default=None,
                        help="host memory per node (default: this machine's)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node with --gpu-memory-gib")
    parser.add_argument("--stage", choices=STAGES, default="rl",
                        help="what to plan: the RL run (`train`, default), the SFT stage (`sft`) or "
                             "reward-model training (`rm`)")


def _target(ns: argparse.Namespace):
    for name in ("gpu_memory_gib", "host_memory_gib"):
        value = getattr(ns, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if ns.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {ns.gpus_per_node}")
    host = int(ns.host_memory_gib * GiB) if ns.host_memory_gib else host_memory_bytes()
    if ns.gpu_memory_gib:
        return Target(int(ns.gpu_memory_gib * GiB), host, ns.gpus_per_node)
    local = local_target()
    return Target(local.gpu_memory, host, local.gpus_per_node)


def _run(ns: argparse.Namespace) -> int:
    cfg = config_from_args(ns, ns.stage)
    target = _target(ns)
    try:
        plan = plan_run(cfg, target, ns.stage)
        fixes = [] if plan.fits else suggest_fixes(cfg, plan, target, stage=ns.stage)
    except ShapeError as err:
        raise ConfigError(str(err)) from None
    lines = role_lines(cfg, target, ns.stage)
    print(render(plan, fixes, split_config_args(ns.config_args)[0] or DEFAULT_RECIPE, lines))
    return 0 if plan.fits else 1


PLAN_COMMANDS = {
    "plan": Command("say whether a run fits, per role and device, and which changes make it fit: "
                    "`plan [CONFIG] [key=value ...] [--gpu-memory-gib N] [--stage rl|sft|rm]`", _add, _run),
}
