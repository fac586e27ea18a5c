"""DeepSpeed checkpoints per role, and export to a plain HF directory.

A checkpoint is DeepSpeed's own sharded layout (each rank writes its partition of parameters and
optimizer state), so saving never gathers the model; ``client_state`` carries the trainer's counters.
Export gathers the full parameters piece by piece (``engine.gather``) and writes an HF ``save_pretrained``
directory on rank 0, with the tokenizer, that loads anywhere with ``from_pretrained``.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from rlhf_ds.engine import dist
from rlhf_ds.engine.gather import full_state_dict
from rlhf_ds.fs import replace_directory


def save_checkpoint(role_engine: Any, directory: str | os.PathLike, client_state: Optional[dict] = None,
                    tag: Optional[str] = None) -> None:
    """Collective: every rank writes its shard under ``directory/<tag>`` (tag default: global step)."""
    role_engine.engine.save_checkpoint(str(directory), tag=tag, client_state=dict(client_state or {}))


def load_checkpoint(role_engine: Any, directory: str | os.PathLike, tag: Optional[str] = None) -> dict:
    """Collective: restore parameters (and optimizer + lr schedule for trainable roles); returns the
    ``client_state`` saved with it."""
    trainable = role_engine.trainable
    path, client_state = role_engine.engine.load_checkpoint(
        str(directory), tag=tag, load_module_strict=True, load_optimizer_states=trainable,
        load_lr_scheduler_states=trainable)
    if path is None:
        raise FileNotFoundError(f"{role_engine.role}: no DeepSpeed checkpoint in {directory} (tag={tag!r}); "
                                f"expected a 'latest' file or a tag directory written by save_checkpoint")
    return client_state or {}


def apply_peak_lr(role_engine: Any, lr: float) -> None:
    """After a load: take the learning rate of the current config, not the checkpoint's.

    DeepSpeed restores the lr scheduler with the base rates it was saved with, which would silently
    ignore a changed ``<role>.lr`` on resume. Our schedule (``engine.build``) is a LambdaLR of factors
    of the peak rate: set the peak and the rate of the step the schedule is at. A scheduler from the
    JSON's own ``scheduler`` section is left as DeepSpeed restored it.
    """
    scheduler = role_engine.engine.lr_scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    scheduler.base_lrs = [float(lr)] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = float(lr)
        group["lr"] = float(lr) * factor(scheduler.last_epoch)


def export_hf(role_engine: Any, directory: str | os.PathLike, bucket_bytes: Optional[int] = None) -> None:
    """Collective: write model (+ tokenizer) as an HF directory on rank 0, swapped in whole."""
    module = role_engine.module
    state = full_state_dict(module, bucket_bytes=bucket_bytes)  # every rank joins the gathers
    if dist.dp_rank() == 0:
        def write(tmp) -> None:
            module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            if role_engine.tokenizer is not None:
                role_engine.tokenizer.save_pretrained(str(tmp))

        replace_directory(directory, write)   # atomic: the old export or the whole new one
    if torch_dist.is_initialized():
        torch_dist.barrier()
