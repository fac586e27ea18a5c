"""The plan as a user reads it: per device, per process, what holds the bytes; the verdict; the fixes;
and the check every run makes before it starts (``check_fits``)."""
from __future__ import annotations

import os

from rlhf_ds.choices import Stage
from rlhf_ds.config import Config, ConfigError
from rlhf_ds.plan.advice import Fix
from rlhf_ds.plan.memory import describe
from rlhf_ds.plan.planner import USABLE_FRACTION, DevicePlan, Plan, local_target, plan_run


def device_lines(device: DevicePlan) -> list[str]:
    verdict = "fits" if device.fits else f"DOES NOT FIT: {describe(device.shortfall)} short"
    lines = [f"{device.name}: {describe(device.total)} of {describe(device.usable)} usable "
             f"({USABLE_FRACTION:.0%} of {describe(device.capacity)}) - {verdict}"]
    for label, _, what in device.parts:
        parts = ", ".join(f"{name} {describe(nbytes)}" for name, nbytes in what.items() if nbytes)
        lines.append(f"    {label}: {describe(sum(what.values()))} = {parts}")
    return lines


def shortfall_message(plan: Plan) -> str:
    """One line per device that does not fit: the device, its roles and the shortfall."""
    return "; ".join(f"{d.name} ({', '.join(d.roles())}) needs {describe(d.total)} but has "
                     f"{describe(d.usable)} usable: {describe(d.shortfall)} short" for d in plan.failing())


def render(plan: Plan, fixes: list[Fix], where: str, roles: list[str]) -> str:
    lines = [f"plan for {where} on {plan.target.describe()}", ""] + roles + [""]
    for device in plan.devices:
        lines += device_lines(device)
    lines.append("")
    if plan.fits:
        lines.append("verdict: the run fits.")
        return "\n".join(lines)
    lines.append(f"verdict: the run does not fit: {shortfall_message(plan)}")
    if not fixes:
        lines.append("no change tried helps: more or bigger devices are needed")
        return "\n".join(lines)
    if not fixes[0].plan.fits:
        fix = fixes[0]
        lines.append(f"no change tried makes it fit; the closest found: {' '.join(fix.overrides)}")
        lines.append(f"     cost: {fix.cost}; still short: {shortfall_message(fix.plan)}")
        return "\n".join(lines)
    lines.append("changes that make it fit, cheapest first (each planned again):")
    for n, fix in enumerate(fixes, 1):
        worst = max(fix.plan.devices, key=lambda d: d.total / d.usable)
        lines.append(f"  {n}. {' '.join(fix.overrides)}")
        lines.append(f"     cost: {fix.cost}; fullest device then {worst.name} at "
                     f"{describe(worst.total)} of {describe(worst.usable)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- before a run

class PlanError(ConfigError):
    """A run that cannot fit the machine it is about to start on."""


def check_fits(cfg: Config, log=print, stage: Stage = "rl") -> None:
    """``rlhf-ds train`` / ``sft`` / ``rm`` run this first: refuse a run that cannot fit this machine, naming
    the device, its roles and the shortfall (``trainer.skip_plan=true`` skips the check)."""
    if cfg.trainer.skip_plan:
        return
    if cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS"):
        log("plan: joining a Ray cluster whose devices this process cannot see: not checked here; "
            "`rlhf-ds plan CONFIG --gpu-memory-gib N` plans for its GPUs")
        return
    target = local_target()
    plan = plan_run(cfg, target, stage)
    if not plan.fits:
        stage_option = "" if stage == "rl" else f" --stage {stage}"
        raise PlanError(f"the run does not fit {target.describe()}: {shortfall_message(plan)}. "
                        f"`rlhf-ds plan{stage_option}` with the same config and overrides shows the breakdown and "
                        f"the changes that make it fit; trainer.skip_plan=true starts it anyway")
