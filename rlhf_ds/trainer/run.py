"""Whole runs: warm start (cached), role start-up, the RL loop, export."""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable

from rlhf_ds.cluster.env import process_rank
from rlhf_ds.config import Config, config_from_dict
from rlhf_ds.data.prompts import load_run_records

Log = Callable[[str], None]


def with_warm_start(cfg: Config, log: Log = print) -> Config:
    """Run (or reuse) the SFT warm start; roles that started from the actor's model start from its result."""
    if cfg.trainer.sft.steps == 0:
        return cfg
    from rlhf_ds.trainer.sft_trainer import run_sft

    # The SFT stage is collective: under the deepspeed launcher every rank trains, rank 0 publishes the
    # cached result (the Ray driver is rank 0).
    base = cfg.actor.model_path
    warm = run_sft(cfg, log if process_rank() == 0 else (lambda *_: None))
    overrides = [f"{role}.model_path={warm}" for role in ("actor", "reference", "critic")
                 if getattr(cfg, role).model_path == base]
    # The resolved config saved with the run starts from the warm model: re-running it must not warm-start twice.
    overrides.append("trainer.sft.steps=0")
    return config_from_dict(cfg.to_dict(), overrides)


def build_trainer(cfg: Config, show_progress: bool = True):
    """Start the roles of ``cfg`` and return (the RL trainer over them, its rule-reward runner or None).
    The caller owns both: ``runner.close()`` and ``trainer.roles.shutdown()`` when done. A failure while
    starting leaves nothing behind (reward workers, Ray actors, placement groups)."""
    from rlhf_ds.cluster.roles import build_roles
    from rlhf_ds.data.rewards import runner_from_config
    from rlhf_ds.engine.build import total_optimizer_steps
    from rlhf_ds.models.tokenizer import check_chat_template, load_tokenizer
    from rlhf_ds.trainer.rl_trainer import RLTrainer

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
    from rlhf_ds.cluster.roles import role_ranks
    from rlhf_ds.models.files import ModelCheckError, check_reward_head, check_vocabularies, vocab_size
    from rlhf_ds.models.tiny import resolve_model_path

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
    from rlhf_ds.engine.build import CAUSAL_ROLES
    from rlhf_ds.models.blocks import AUTO, NONE
    from rlhf_ds.models.files import ModelCheckError
    from rlhf_ds.plan.shapes import ShapeError, model_shape

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


@contextmanager
def stop_on_signals():
    """SIGTERM / SIGINT ask the run to stop at its next safe point (a checkpoint is written there); a
    second signal interrupts at once. Yields the flag to poll. Only the main thread can take signals."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum, _frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print(f"rlhf-ds: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(again to stop now)", flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_training(cfg: Config, log: Log = print, show_progress: bool = True) -> dict:
    """`rlhf-ds train`: returns the run summary (also written to OUTPUT_DIR/summary.json)."""
    from rlhf_ds.plan.planner import check_fits
    from rlhf_ds.trainer.resume import check_resume

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
