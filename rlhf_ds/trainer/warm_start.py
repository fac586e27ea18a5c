"""The supervised warm start of the actor before RL: the ZeRO-3 SFT stage, run once and cached.

RL with a bare 0/1 reward only moves a model that already succeeds sometimes, so the default run first
fine-tunes the tiny model on ``prompt -> answer<eos>`` until held-out greedy accuracy (scored by the
run's rule rewards, as RL evaluation scores it) reaches ``trainer.sft.target_eval_accuracy`` (docs/benchmarks.md#how-the-demo-task-was-chosen:
stop on validation accuracy, not on time — the data order moves the jump by ~20 s). The training is the
SFT stage of ``rlhf-ds sft`` (``trainer.sft_stage``: the actor's ZeRO-3 engine, the sum-gradient step, the
same groups as RL), writing its metrics under ``OUTPUT_DIR/sft``; it keeps no checkpoints, its result is
the cache.

The result is an HF directory in the cache keyed by everything that determines it; a finished directory
(marker written last) is reused at once, so `make train-grpo` pays for SFT only the first time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from rlhf_ds.config import Config, config_from_dict
from rlhf_ds.env import process_rank
from rlhf_ds.fs import publish_directory
from rlhf_ds.models.tiny import default_cache_dir
from rlhf_ds.trainer.sft_stage import encode_examples, run_sft_stage

__all__ = ["MARKER", "encode_examples", "run_sft", "sft_dir", "wait_for_sft", "with_warm_start"]

MARKER = ".sft_complete"


def sft_dir(cfg: Config) -> Path:
    """Cache directory of the warm start this config asks for."""
    key = {"model": cfg.actor.model_path, "sft": dataclasses.asdict(cfg.trainer.sft), "seed": cfg.seed,
           "data": [cfg.data.train_path, cfg.data.eval_path, cfg.data.num_train, cfg.data.num_eval,
                    cfg.data.task_seed, cfg.data.prompt_key, cfg.data.answer_key],
           "max_response_len": cfg.rollout.max_response_len, "version": 1}
    # The tokenizer and the rewards that score the stop, keyed only when they differ from what every
    # warm start used before they were keys (the model's tokenizer, exact_match), so those stay valid.
    if cfg.actor.tokenizer_path:
        key["tokenizer"] = cfg.actor.tokenizer_path
    if cfg.data.apply_chat_template:   # the prompts it trained on were templated
        key["chat_template"] = True
    scored_by = [list(cfg.reward.functions) or ["exact_match"], list(cfg.reward.function_weights),
                 cfg.reward.correct_score]   # no functions: exact_match scores evaluation
    if scored_by != [["exact_match"], [], 1.0]:
        key["eval"] = scored_by
    if cfg.reward.remote.url:   # a remote endpoint scores the stop too
        key["eval_remote"] = [cfg.reward.remote.url, cfg.reward.remote.weight]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = cfg.actor.model_path.replace("tiny:", "").replace("/", "_").strip("_")[-40:]
    return default_cache_dir() / "sft" / f"{name}-{digest}"


def run_sft(cfg: Config, log=print) -> str:
    """Warm-start the actor (or reuse the cached result); returns the HF directory.

    Collective: under the deepspeed launcher every rank runs the stage; rank 0 publishes the result
    and the other ranks wait for it (the cache directory is on a file system they share)."""
    out = sft_dir(cfg)
    if (out / MARKER).exists():
        log(f"sft: reusing {out} ({(out / MARKER).read_text().strip()})")
        return str(out)
    work = os.path.join(cfg.trainer.output_dir, "sft")
    log(f"sft: warm start of {cfg.actor.model_path} to held-out accuracy {cfg.trainer.sft.target_eval_accuracy} "
        f"(at most {cfg.trainer.sft.steps} steps; metrics in {work})")
    summary = run_sft_stage(cfg, output_dir=work, resume=False, checkpoints=False, log=log, show_progress=False)
    if process_rank() > 0:
        return wait_for_sft(cfg)
    last = summary.get("last_eval") or {"step": summary["steps"], "accuracy": float("nan")}
    note = (f"{summary['steps']} steps, held-out accuracy {last['accuracy']:.3f}, "
            f"{summary['total_wall_time_s']:.1f} s")
    # SFT runs once per cache key: an unfinished directory left by a killed run is replaced
    publish_directory(out, lambda tmp: shutil.copytree(summary["export"], tmp), MARKER, note + "\n")
    log(f"sft: saved {out} ({note})")
    return str(out)


def wait_for_sft(cfg: Config, timeout_s: float = 3600.0) -> str:
    """The warm start another process is producing (SPMD ranks > 0), once its marker exists."""
    out, deadline = sft_dir(cfg), time.time() + timeout_s
    while not (out / MARKER).exists():
        if time.time() > deadline:
            raise TimeoutError(f"no finished SFT warm start at {out} after {timeout_s:.0f} s")
        time.sleep(1.0)
    return str(out)


def with_warm_start(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """Run (or reuse) the SFT warm start; roles that started from the actor's model start from its result."""
    if cfg.trainer.sft.steps == 0:
        return cfg
    # The SFT stage is collective: under the deepspeed launcher every rank trains, rank 0 publishes the
    # cached result (the Ray driver is rank 0).
    base = cfg.actor.model_path
    warm = run_sft(cfg, log if process_rank() == 0 else (lambda *_: None))
    overrides = [f"{role}.model_path={warm}" for role in ("actor", "reference", "critic")
                 if getattr(cfg, role).model_path == base]
    # The resolved config saved with the run starts from the warm model: re-running it must not warm-start twice.
    overrides.append("trainer.sft.steps=0")
    return config_from_dict(cfg.to_dict(), overrides)
