"""Run checkpoints: every trainable role's DeepSpeed checkpoint plus the trainer's own state.

Layout: ``OUTPUT_DIR/checkpoints/step_<N>/{actor,critic}/`` (DeepSpeed: parameters, optimizer, lr
scheduler) and ``trainer_state.pt`` (step, data-loader position, KL-controller state, driver RNG
states). The ``COMPLETE`` marker is written last, so a run killed mid-save leaves a directory that
resume ignores; ``latest_checkpoint`` picks the highest complete step.
"""
from __future__ import annotations

import os
import random
import re
import time
from typing import Any, Optional

import numpy as np
import torch

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(output_dir), f"step_{step}")


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint of the highest step, or None."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return None
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))
             and os.path.exists(os.path.join(root, name, MARKER))]
    return step_dir(output_dir, max(steps)) if steps else None


def retire_checkpoints(output_dir: str) -> Optional[str]:
    """A fresh run in a used output_dir: move the earlier run's checkpoints aside (renamed, never deleted),
    so a later ``trainer.resume=true`` cannot pick up a step of the earlier run. Returns the new name."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root) or not os.listdir(root):
        return None
    retired = f"{root}.before-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(root, retired)
    return retired


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_run_checkpoint(output_dir: str, step: int, trainable_groups: dict[str, Any], trainer_state: dict,
                        write_files: bool = True) -> str:
    """Collective over every trainable role's ranks; returns the checkpoint directory. ``write_files``:
    whether this process writes the trainer state and the marker (SPMD: rank 0 only)."""
    directory = step_dir(output_dir, step)
    os.makedirs(directory, exist_ok=True)
    pending = [group.run_all_async("save_checkpoint", os.path.join(directory, role), {"step": step})
               for role, group in trainable_groups.items()]
    for p in pending:
        p.get()   # under SPMD this also orders the marker after every rank's shard (the gather syncs)
    if not write_files:
        return directory
    torch.save({**trainer_state, "rng": rng_state()}, os.path.join(directory, "trainer_state.pt"))
    with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as f:
        f.write(f"step {step}\n")
    return directory


def load_run_checkpoint(directory: str, trainable_groups: dict[str, Any]) -> dict:
    """Restore every trainable role and the driver RNG; returns the trainer state dict."""
    for role, group in trainable_groups.items():
        role_dir = os.path.join(directory, role)
        if not os.path.isdir(role_dir):
            raise FileNotFoundError(f"checkpoint {directory} has no {role!r} directory; it was written by a "
                                    f"run without that role (change the config back, or start a new output_dir)")
        group.run_all("load_checkpoint", role_dir)
    state = torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
