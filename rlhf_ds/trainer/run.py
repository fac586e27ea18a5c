"""Whole runs: warm start (cached), role start-up, the RL loop, export."""
from __future__ import annotations

import os
import time
from typing import Callable

from rlhf_ds.cluster.roles import build_roles, role_ranks
from rlhf_ds.config import Config
from rlhf_ds.data.prompts import load_run_records
from rlhf_ds.engine.build import CAUSAL_ROLES, total_optimizer_steps
from rlhf_ds.env import process_rank
from rlhf_ds.models.blocks import AUTO, NONE
from rlhf_ds.models.files import ModelCheckError, check_reward_head, check_vocabularies, vocab_size
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.models.tokenizer import check_chat_template, load_tokenizer
from rlhf_ds.plan.report import check_fits
from rlhf_ds.plan.shapes import ShapeError, model_shape
from rlhf_ds.rewards import runner_from_config
from rlhf_ds.trainer.resume import check_resume
from rlhf_ds.trainer.rl_trainer import RLTrainer
from rlhf_ds.trainer.signals import stop_on_signals
from rlhf_ds.trainer.warm_start import with_warm_start

Log = Callable[[str], None]


def build_trainer(cfg: Config, show_progress: bool = True):
    """Start the roles of ``cfg`` and return (the RL trainer over them, its rule-reward runner or None).
    The caller owns both: ``runner.close()`` and ``trainer.roles.shutdown()`` when done. A failure while
    starting leaves nothing behind (reward workers, Ray actors, placement groups)."""
    tokenizer = load_tokenizer(cfg.actor.model_path, cfg.actor.tokenizer_path)
    check_chat_template(tokenizer, cfg.data.apply_chat_template, "actor")
    check_role_models(cfg, len(tokenizer))
    train, held_out = load_run_records(cfg.data)
    runner = runner_from_config(cfg.reward)
    roles = None
    try:
        roles = build_roles(cfg, total_optimizer_steps(cfg))
        return RLTrainer(cfg, roles, tokenizer, train, held_out, runner, show_progress), runner
    except BaseException:
        _close(runner, roles)
        raise


def check_role_models(cfg: Config, tokenizer_size: int) -> None:
    """Before any engine is built, refuse models that would load but run wrongly: a tokenizer with ids
    past the actor's embedding, roles whose vocabulary differs from the actor's (they read its token ids),
    a reward model without its trained head (``models.files``). Reads configs and checkpoint headers only."""
    models = {f"{role}.model_path": resolve_model_path(getattr(cfg, role).model_path)
              for role, ranks in role_ranks(cfg).items() if ranks and role != "rollout"}   # the actor first
    actor = models["actor.model_path"]
    rows = vocab_size(actor)
    if tokenizer_size > rows:
        source = (f"actor.tokenizer_path={cfg.actor.tokenizer_path}" if cfg.actor.tokenizer_path
                  else "the tokenizer saved with actor.model_path")
        raise ModelCheckError(f"{source} has {tokenizer_size} tokens, more than the {rows} rows (vocab_size) of "
                              f"the embedding of actor.model_path={actor}: use the model's own tokenizer")
    check_vocabularies(models)
    if "reward.model_path" in models:
        check_reward_head(models["reward.model_path"], "reward.model_path")
    _check_leaf_modules(cfg, [field.split(".")[0] for field in models])


def _check_leaf_modules(cfg: Config, roles: list[str]) -> None:
    """Class names in ``<role>.zero3_leaf_modules`` exist in the role's model (read on the meta device)."""
    for role in roles:
        role_cfg = getattr(cfg, role)
        if role_cfg.zero3_leaf_modules.strip() in (AUTO, NONE):
            continue
        try:
            model_shape(role_cfg.model_path, value_head=role not in CAUSAL_ROLES,
                        leaf_modules=role_cfg.zero3_leaf_modules, field=f"{role}.zero3_leaf_modules")
        except ShapeError as err:
            raise ModelCheckError(str(err)) from None


def _close(runner, roles) -> None:
    """Stop the reward workers and every role, even when one of them fails to stop."""
    try:
        if runner is not None:
            runner.close()
    finally:
        if roles is not None:
            roles.shutdown()


def run_training(cfg: Config, log: Log = print, show_progress: bool = True) -> dict:
    """`rlhf-ds train`: returns the run summary (also written to OUTPUT_DIR/summary.json)."""
    started = time.time()
    check_fits(cfg, log)   # before any model is built or warm-started
    cfg = with_warm_start(cfg, log)
    if cfg.trainer.resume:
        check_resume(cfg, log)   # refuse a resume that would change the run, before anything starts
    os.makedirs(cfg.trainer.output_dir, exist_ok=True)
    if process_rank() == 0:
        cfg.save(os.path.join(cfg.trainer.output_dir, "config.yaml"))
    trainer, runner = build_trainer(cfg, show_progress)
    try:
        # installed after the roles start: Ray's own start-up replaces the process's SIGTERM handler
        with stop_on_signals() as stop_requested:
            trainer.stop_requested = stop_requested
            summary = trainer.fit()
        final = os.path.join(cfg.trainer.output_dir, "actor_hf")
        trainer.roles.actor.run_all("export_hf", final)
        summary.update(total_wall_time_s=round(time.time() - started, 1), actor_hf=final)
        return summary
    finally:
        _close(runner, trainer.roles)
