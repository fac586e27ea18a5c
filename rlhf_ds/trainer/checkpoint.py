"""Run checkpoints: every trainable role's DeepSpeed checkpoint plus the trainer's own state and config.

Layout of a published checkpoint: ``OUTPUT_DIR/checkpoints/step_<N>/`` holding ``{actor,critic}/``
(DeepSpeed: parameters, optimizer, lr scheduler, skip counter), ``trainer_state.json`` (step, data-loader
position, KL-controller state, driver RNG states: plain JSON, nothing is unpickled on resume),
``config.yaml`` (the resolved config that wrote it) and the ``COMPLETE`` marker.

Atomic: everything is written under ``checkpoints/.step_<N>.partial``, flushed to disk, and the
directory is renamed to ``step_<N>`` last, so a checkpoint is visible only when complete; a run killed
mid-save leaves a partial directory that resume ignores and the next save clears. Retention
(``trainer.keep_checkpoints``) deletes older checkpoints only after the new one is published, so there
is always a good one to resume from.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Any, Optional

import numpy as np
import torch

from rlhf_ds.fs import fsync_tree

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_RETIRED = re.compile(r"^checkpoints\.before-")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(output_dir), f"step_{step}")


def partial_dir(output_dir: str, step: int) -> str:
    """Where a checkpoint is written before it is published (the same name on every SPMD rank)."""
    return os.path.join(checkpoint_root(output_dir), f".step_{step}.partial")


def complete_steps(output_dir: str) -> list[int]:
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))
                  and os.path.exists(os.path.join(root, name, MARKER)))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint of the highest step, or None."""
    steps = complete_steps(output_dir)
    return step_dir(output_dir, steps[-1]) if steps else None


def retire_checkpoints(output_dir: str, keep: int = 0) -> Optional[str]:
    """A fresh run in a used output_dir: move the earlier run's checkpoints aside (renamed), so a later
    ``trainer.resume=true`` cannot pick up a step of the earlier run. Of the directories moved aside, the
    newest ``keep`` are kept (0: all). Returns the new name."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root) or not os.listdir(root):
        return None
    retired = f"{root}.before-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(root, retired)
    if keep:
        earlier = sorted(n for n in os.listdir(output_dir) if _RETIRED.match(n))
        for name in earlier[:-keep]:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return retired


def prune_checkpoints(output_dir: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints (0: keep all) and any partial directory
    left by a killed save. Returns the steps deleted."""
    root = checkpoint_root(output_dir)
    steps = complete_steps(output_dir)
    doomed = steps[:-keep] if keep else []
    for step in doomed:
        shutil.rmtree(step_dir(output_dir, step), ignore_errors=True)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------- trainer state as JSON

def rng_state() -> dict:
    """The driver's RNG states as JSON-able values."""
    numpy_state = np.random.get_state()
    if not isinstance(numpy_state, tuple):   # a dict only when the global generator is not an MT19937
        raise RuntimeError(f"numpy's global RNG is {numpy_state.get('bit_generator')}, not MT19937: "
                           "its state cannot be saved")
    name, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def read_trainer_state(directory: str) -> dict:
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- save and load

def save_run_checkpoint(output_dir: str, step: int, trainable_groups: dict[str, Any], trainer_state: dict,
                        config_yaml: str, write_files: bool = True, keep: int = 0) -> str:
    """Collective over every trainable role's ranks; returns the published directory. ``write_files``:
    whether this process writes the trainer state, publishes and prunes (SPMD: rank 0 only)."""
    partial, final = partial_dir(output_dir, step), step_dir(output_dir, step)
    if write_files and os.path.exists(partial):
        shutil.rmtree(partial)   # left by a save that was killed at this same step
    pending = [group.run_all_async("save_checkpoint", os.path.join(partial, role), {"step": step})
               for role, group in trainable_groups.items()]
    for p in pending:
        p.get()   # under SPMD this also orders the publish after every rank's shard (the gather syncs)
    if not write_files:
        return final
    with open(os.path.join(partial, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump({**trainer_state, "rng": rng_state()}, f)
    with open(os.path.join(partial, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config_yaml)
    with open(os.path.join(partial, MARKER), "w", encoding="utf-8") as f:
        f.write(f"step {step}\n")
    fsync_tree(partial)
    if os.path.exists(final):   # a step saved again (a resumed run repeating its last step)
        shutil.rmtree(final)
    os.rename(partial, final)
    fsync_tree(checkpoint_root(output_dir), files=False)
    prune_checkpoints(output_dir, keep)
    return final


def load_run_checkpoint(directory: str, trainable_groups: dict[str, Any]) -> dict:
    """Restore every trainable role and the driver RNG; returns the trainer state dict."""
    for role, group in trainable_groups.items():
        role_dir = os.path.join(directory, role)
        if not os.path.isdir(role_dir):
            raise FileNotFoundError(f"checkpoint {directory} has no {role!r} directory; it was written by a "
                                    f"run without that role (change the config back, or start a new output_dir)")
        group.run_all("load_checkpoint", role_dir)
    state = read_trainer_state(directory)
    set_rng_state(state.pop("rng"))
    return state
