"""Build one role's DeepSpeed ZeRO-3 engine from an HF directory.

Construction is pre-sharded: a live ``HfDeepSpeedConfig`` makes ``from_pretrained`` build the model
inside ``deepspeed.zero.Init``, so no rank ever holds the whole model. Actor and reference are causal
LMs; critic and reward are :class:`ValueModel` (backbone + scalar head). Trainable roles get AdamW
(from the JSON's ``optimizer`` section) and, unless the JSON has its own ``scheduler`` section, a
warmup + constant / linear / cosine schedule from the config tree. Inference roles (reference, reward)
are ``deepspeed.initialize`` engines without an optimizer, as in OpenRLHF.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from rlhf_ds.choices import LR_SCHEDULES, ROLES, TRAINABLE_ROLES
from rlhf_ds.engine import dist
from rlhf_ds.engine.ds_config import role_ds_config, write_ds_config
from rlhf_ds.models.blocks import leaf_module_classes

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CAUSAL_ROLES = ("actor", "reference")


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warmup is linear from lr/warmup_steps (first update) to lr (update number warmup_steps); then
    constant, or a linear / cosine decay reaching ``min_lr_ratio * lr`` at ``total_steps``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}; valid: {list(LR_SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def total_optimizer_steps(cfg: Any) -> int:
    """Optimizer steps of a whole run: RL steps x epochs x mini-batches per rollout batch."""
    sequences = cfg.data.prompts_per_step * cfg.rollout.n
    return cfg.trainer.max_steps * cfg.algo.epochs * max(1, math.ceil(sequences / cfg.algo.mini_batch_size))


@dataclass
class RoleEngine:
    """A role's engine and what was used to build it."""
    role: str
    engine: Any                      # deepspeed.DeepSpeedEngine
    ds_config: dict
    model_path: str
    tokenizer: Any = None            # None when the directory has no tokenizer files

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def trainable(self) -> bool:
        return self.role in TRAINABLE_ROLES

    @property
    def micro_batch_size(self) -> int:
        return int(self.ds_config["train_micro_batch_size_per_gpu"])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), the usual AdamW practice."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _load_presharded(role: str, model_path: str, dtype: torch.dtype, ds_config: dict) -> PreTrainedModel:
    """Load with ZeRO-3 partitioning at construction (no rank holds the whole model).

    A live ``HfDeepSpeedConfig`` switches transformers into ZeRO-3 mode for the whole process, so it is
    released right after the load: plain loads that follow in the same process (the HF rollout engine,
    a tiny value model built on first use, several roles under the deepspeed launcher) stay plain.
    """
    # transformers: loaded when first needed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841  (read through a weak reference)
    try:
        return _load_model(role, model_path, dtype)
    finally:
        unset_hf_deepspeed_config()


def _load_model(role: str, model_path: str, dtype: torch.dtype) -> PreTrainedModel:
    if role in CAUSAL_ROLES:
        # transformers: loaded when first needed
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    # transformers: loaded when first needed
    from rlhf_ds.models.value_model import ValueModel
    # A causal-LM directory also loads: its backbone weights share the names, the head starts at zero.
    return ValueModel.from_pretrained(model_path, dtype=dtype)


def _load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer  # transformers: loaded when first needed
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError):
        return None


@contextmanager
def _one_thread():
    """torch runs one thread inside the block, and the process's count again after it.

    Building an engine runs the process group's first collectives (ZeRO-3 partitioning at load,
    DeepSpeed's broadcasts) on gloo's own threads. A thread takes torch's thread count the first time it
    works, and keeps it: with two, each gloo thread keeps an OpenMP pool of its own for the life of the
    process, libgomp then counts more threads than cores and makes every thread sleep after ~100 spins
    instead of waiting for work, and each later parallel operation of the process pays the wake-ups
    (measured on 2 cores: 8,000 voluntary context switches and 1.7x the time for 2,000 small matrix
    products, and a decode 1.2-2x slower). Built under one thread, those threads keep one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_engine(cfg: Any, role: str, *, total_steps: Optional[int] = None,
                 output_dir: Optional[str] = None) -> RoleEngine:
    """Engine of ``role`` (actor | critic | reference | reward) on this process's data-parallel group.

    total_steps: optimizer steps the lr schedule spans (default: from the config tree);
    output_dir: where ``ds_config_<role>.json`` is written (default ``cfg.trainer.output_dir``).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}; valid: {list(ROLES)}")
    with _one_thread():
        return _build_engine(cfg, role, total_steps, output_dir)


def _build_engine(cfg: Any, role: str, total_steps: Optional[int], output_dir: Optional[str]) -> RoleEngine:
    import deepspeed  # deepspeed: in the processes that build engines

    dist.init_distributed(timeout_s=cfg.cluster.dist_timeout_s)
    role_cfg = getattr(cfg, role)
    ds_config = role_ds_config(cfg, role, dist.dp_size(), dist.has_gpu())
    output_dir = cfg.trainer.output_dir if output_dir is None else output_dir
    if output_dir and dist.dp_rank() == 0:
        write_ds_config(ds_config, output_dir, role)

    # transformers: loaded when first needed
    from rlhf_ds.models.tiny import resolve_model_path
    model_path = resolve_model_path(role_cfg.model_path)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    model = _load_presharded(role, model_path, dtype, ds_config)
    _set_leaf_modules(model, role_cfg.zero3_leaf_modules, f"{role}.zero3_leaf_modules", model_path)

    if role in TRAINABLE_ROLES:
        if role_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        scheduler = None
        if "scheduler" not in ds_config:
            steps = total_optimizer_steps(cfg) if total_steps is None else total_steps
            scheduler = _scheduler_factory(role_cfg, steps)
        # deepspeed annotates model_parameters as a Module and lr_scheduler's callable as returning the
        # legacy _LRScheduler; its documentation and code take parameter groups and any LRScheduler
        engine, *_ = deepspeed.initialize(
            model=model, config=ds_config,
            model_parameters=_param_groups(model, role_cfg.weight_decay),  # pyright: ignore[reportArgumentType]
            lr_scheduler=scheduler)  # pyright: ignore[reportArgumentType]
        engine.train()
    else:
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
    return RoleEngine(role=role, engine=engine, ds_config=ds_config, model_path=model_path,
                      tokenizer=_load_tokenizer(role_cfg.tokenizer_path or model_path))


def _set_leaf_modules(model: torch.nn.Module, spec: str, field: str, model_path: str) -> None:
    """Mark the modules ``spec`` names as ZeRO-3 leaves (gathered and hooked as one unit), before
    ``deepspeed.initialize`` registers the hooks."""
    from deepspeed.utils import set_z3_leaf_modules  # deepspeed: in the processes that build engines

    classes = leaf_module_classes(model, spec, field, model_path)
    if classes:
        set_z3_leaf_modules(model, list(classes))


def _scheduler_factory(role_cfg: Any, total_steps: int
                       ) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """DeepSpeed builds the optimizer, so hand it a callable that wraps the optimizer in LambdaLR."""
    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        def factor(step: int) -> float:
            return lr_factor(step, schedule=role_cfg.lr_schedule, warmup_steps=role_cfg.warmup_steps,
                             total_steps=total_steps, min_lr_ratio=role_cfg.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return make

