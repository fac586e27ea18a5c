"""The loop shared by the supervised stages (SFT, reward-model training) and their start-up.

A stage trains one role group on fixed data: every step draws a mini-batch (``PromptLoader``: seeded,
resumable), sets its loss weights on the whole mini-batch, and takes one optimizer step on the group;
every ``eval_interval`` steps (and at step 0, the "before" point) it evaluates on held-out data. It
writes what an RL run writes (``RunLogger``: ``metrics.jsonl``, TensorBoard, ``summary.json``), saves
run checkpoints (``trainer.checkpoint``: the role's DeepSpeed state plus step and data position) and
resumes from them. A stage may stop early once its held-out metric reaches a target (the SFT warm start).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, TypeVar

from rlhf_ds.config import Config
from rlhf_ds.data.prompts import PromptLoader
from rlhf_ds.env import process_rank
from rlhf_ds.models.tokenizer import check_chat_template, load_tokenizer
from rlhf_ds.trainer import checkpoint
from rlhf_ds.trainer.logging import RunLogger
from rlhf_ds.trainer.resume import check_resume
from rlhf_ds.trainer.signals import stop_on_signals

Log = Callable[[str], None]


class StageLoop:
    """One stage over one trainable group. Subclasses set ``name`` (metric prefix), ``eval_key`` (the
    held-out metric of the summary) and implement ``train_step`` and ``evaluate``."""
    name = ""
    eval_key = ""

    def __init__(self, cfg: Config, roles: Any, role: str, records: list, *, steps: int, batch_size: int,
                 eval_interval: int, save_interval: int, checkpoints: bool = True, show_progress: bool = True,
                 log: Log = print):
        self.cfg, self.roles, self.role = cfg, roles, role
        self.group = roles.groups[role]
        self.loader = PromptLoader(records, batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.steps, self.eval_interval, self.save_interval = steps, eval_interval, save_interval
        self.checkpoints, self.show_progress, self.log = checkpoints, show_progress, log
        self.step = 0
        # set by the caller (SIGTERM / SIGINT handlers): stop at the next step, with a checkpoint
        self.stop_requested: Callable[[], bool] = lambda: False

    @property
    def output_dir(self) -> str:
        return self.cfg.trainer.output_dir

    @property
    def is_main(self) -> bool:
        return self.roles.is_main

    # ---------------------------------------------------------------- what a stage defines
    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def target_reached(self, metrics: dict[str, float]) -> bool:
        """Whether the stage may stop after this evaluation (default: never, run every step)."""
        return False

    # ---------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> dict:
        resumed = self.resume() if resume else None
        if resumed is None and self.checkpoints and self.is_main:
            retired = checkpoint.retire_checkpoints(self.output_dir, keep=self.cfg.trainer.keep_checkpoints)
            if retired:
                self.log(f"{self.name}: a fresh run: moved the earlier run's checkpoints to {retired}")
        # summary lines at evaluations and at the end (the stage prints its own line at each evaluation)
        logger = RunLogger(self.output_dir, self.steps, self.step, self.steps + 1, self.show_progress,
                           main=self.is_main, config=self.cfg)
        started = time.perf_counter()
        if self.step == 0:
            logger.log(0, self._evaluate(started))
        stopped = reached = None
        while self.step < self.steps:
            self.step += 1
            t0 = time.perf_counter()
            metrics = self.train_step()
            metrics["timing/train_s"] = time.perf_counter() - t0
            metrics["data/epoch"], metrics["data/position"] = self.loader.epoch, self.loader.position
            evaluated = self._due(self.eval_interval)
            if evaluated:
                metrics.update(self._evaluate(started, metrics))
            metrics["timing/step_s"] = time.perf_counter() - t0
            logger.log(self.step, metrics)
            if evaluated and self.target_reached(metrics):
                reached = self.step
            stop = self.roles.any_process(self.stop_requested())   # SPMD ranks stop at the same step
            if self.checkpoints and (self._due(self.save_interval) or reached or stop):
                self.save()
            if reached or stop:
                stopped = None if reached else self.step
                break
        return logger.finish({"resumed_from": resumed, "stopped_at_step": stopped, "target_reached_at_step": reached,
                              **self._eval_summary(logger.history)})

    def _due(self, interval: int) -> bool:
        return self.step == self.steps or (interval > 0 and self.step % interval == 0)

    def _evaluate(self, started: float, train_metrics: Optional[dict] = None) -> dict[str, float]:
        t0 = time.perf_counter()
        out = self.evaluate()
        out["timing/eval_s"] = time.perf_counter() - t0
        loss = (train_metrics or {}).get(f"{self.name}/loss")
        self.log(f"{self.name}: step {self.step}/{self.steps}" + (f" loss {loss:.4f}" if loss is not None else "")
                 + f" {self.eval_key} {out[self.eval_key]:.3f} ({time.perf_counter() - started:.0f} s)")
        return out

    def _eval_summary(self, history: list[dict]) -> dict:
        evals = [(row["step"], row[self.eval_key]) for row in history if self.eval_key in row]
        if not evals:
            return {}
        return {"eval_key": self.eval_key, "first_eval": {"step": evals[0][0], "accuracy": evals[0][1]},
                "last_eval": {"step": evals[-1][0], "accuracy": evals[-1][1]}}

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> str:
        state = {"step": self.step, "loader": self.loader.state_dict()}
        return checkpoint.save_run_checkpoint(self.output_dir, self.step, {self.role: self.group}, state,
                                              self.cfg.to_yaml(), write_files=self.is_main,
                                              keep=self.cfg.trainer.keep_checkpoints)

    def resume(self) -> Optional[str]:
        """Restore the latest complete checkpoint of ``output_dir`` (None: start fresh). The caller has
        checked its config against this one (:func:`check_stage_resume`)."""
        directory = checkpoint.latest_checkpoint(self.output_dir)
        if directory is None:
            return None
        state = checkpoint.load_run_checkpoint(directory, {self.role: self.group})
        self.step = int(state["step"])
        if self.step > self.steps:
            raise ValueError(f"{self.name}: the latest checkpoint {directory} is at step {self.step}, past the "
                             f"{self.steps} steps of this run; raise them or choose another trainer.output_dir")
        self.loader.load_state_dict(state["loader"])
        return directory


# A stage's run length, evaluation and checkpoint cadence change nothing it computes per step.
STAGE_HARMLESS_KEYS = ("trainer.sft.steps", "trainer.sft.eval_interval", "trainer.sft.save_interval",
                       "trainer.sft.target_eval_accuracy", "trainer.rm.steps", "trainer.rm.eval_interval",
                       "trainer.rm.save_interval")


def check_stage_resume(cfg: Config, log: Log = print) -> Optional[str]:
    """``trainer.resume.check_resume`` for a stage: its own run length and cadence keys are harmless."""
    allowed = tuple(cfg.trainer.allow_resume_changes) + STAGE_HARMLESS_KEYS
    return check_resume(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, allow_resume_changes=allowed)),
                        log)


def stage_config(cfg: Config, output_dir: Optional[str]) -> Config:
    """``cfg`` writing to ``output_dir`` (None: ``trainer.output_dir``)."""
    if not output_dir or output_dir == cfg.trainer.output_dir:
        return cfg
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, output_dir=output_dir))


StageData = TypeVar("StageData")


def open_stage(cfg: Config, output_dir: Optional[str], resume: Optional[bool], *, stage: str, role: str,
               check_data: Callable[[Any], StageData], log: Log = print) -> tuple[Config, bool, Any, StageData]:
    """What a stage refuses before any engine starts, and the files it starts with.

    ``cfg`` writing to ``output_dir`` (None: ``trainer.output_dir``); resume: default ``trainer.resume``;
    stage: "sft" or "rm" (``trainer.<stage>``, which must have steps); role: whose tokenizer encodes the data
    (its chat template checked when ``data.apply_chat_template``); check_data(tokenizer): loads the stage's
    data and encodes it (a prompt too long fails here). Then the resume is checked against the saved
    config, and the config is saved. Returns (config, resume, tokenizer, the data)."""
    cfg = stage_config(cfg, output_dir)
    resume = cfg.trainer.resume if resume is None else resume
    if getattr(cfg.trainer, stage).steps == 0:
        what = {"sft": "SFT stage", "rm": "reward-model training"}[stage]
        raise ValueError(f"trainer.{stage}.steps=0: no {what} configured (set trainer.{stage}.steps)")
    role_cfg = getattr(cfg, role)
    tokenizer = load_tokenizer(role_cfg.model_path, role_cfg.tokenizer_path)
    check_chat_template(tokenizer, cfg.data.apply_chat_template, role)
    data = check_data(tokenizer)
    if resume:
        check_stage_resume(cfg, log)
    os.makedirs(cfg.trainer.output_dir, exist_ok=True)
    if process_rank() == 0:
        cfg.save(os.path.join(cfg.trainer.output_dir, "config.yaml"))
    return cfg, resume, tokenizer, data


def run_stage(cfg: Config, start_roles: Callable[[], Any], make_loop: Callable[[Any], StageLoop], export_name: str,
              *, resume: bool) -> dict:
    """Start a stage's groups (``start_roles() -> Roles``) and its loop (``make_loop(roles)``), run it with the
    SIGTERM / SIGINT stop, export the trained role as an HF directory ``OUTPUT_DIR/<export_name>``, and stop
    every group, even on failure. Returns the loop's summary (also written to ``summary.json``) with
    ``export`` (the HF directory) and ``total_wall_time_s``."""
    started = time.time()
    roles = start_roles()
    try:
        loop = make_loop(roles)
        # installed after the groups start: Ray's own start-up replaces the process's SIGTERM handler
        with stop_on_signals() as stop_requested:
            loop.stop_requested = stop_requested
            summary = loop.fit(resume)
        export = os.path.join(cfg.trainer.output_dir, export_name)
        loop.group.run_all("export_hf", export)
    finally:
        roles.shutdown()
    summary.update(export=export, total_wall_time_s=round(time.time() - started, 1))
    if roles.is_main:
        with open(os.path.join(cfg.trainer.output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary
