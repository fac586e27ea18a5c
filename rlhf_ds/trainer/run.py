"""Whole runs: warm start (cached), role start-up, the RL loop, export; and the benchmark workload."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

from rlhf_ds.config import Config, config_from_dict
from rlhf_ds.trainer.data import load_records

Log = Callable[[str], None]


def with_warm_start(cfg: Config, log: Log = print) -> Config:
    """Run (or reuse) the SFT warm start; roles that started from the actor's model start from its result."""
    if cfg.trainer.sft.steps == 0:
        return cfg
    from rlhf_ds.trainer.sft_trainer import run_sft, wait_for_sft

    # Under the deepspeed launcher rank 0 trains and the other ranks wait for its cached result.
    follower = cfg.cluster.launcher == "deepspeed" and int(os.environ.get("RANK", "0")) > 0
    base = cfg.actor.model_path
    warm = wait_for_sft(cfg) if follower else run_sft(cfg, log)
    overrides = [f"{role}.model_path={warm}" for role in ("actor", "reference", "critic")
                 if getattr(cfg, role).model_path == base]
    # The resolved config saved with the run starts from the warm model: re-running it must not warm-start twice.
    overrides.append("trainer.sft.steps=0")
    return config_from_dict(cfg.to_dict(), overrides)


def _setup(cfg: Config, show_progress: bool):
    from transformers import AutoTokenizer

    from rlhf_ds.data.rewards import RewardRunner
    from rlhf_ds.engine.build import total_optimizer_steps
    from rlhf_ds.models.tiny import resolve_model_path
    from rlhf_ds.trainer.rl_trainer import RLTrainer
    from rlhf_ds.trainer.roles import build_roles

    reward = cfg.reward
    runner = (RewardRunner(list(reward.functions), list(reward.function_weights), reward.timeout_s,
                           reward.failure_value, reward.num_workers) if reward.functions else None)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.actor.tokenizer_path or cfg.actor.model_path))
    train, held_out = load_records(cfg)
    roles = build_roles(cfg, total_optimizer_steps(cfg))
    return RLTrainer(cfg, roles, tokenizer, train, held_out, runner, show_progress), runner


def run_training(cfg: Config, log: Log = print, show_progress: bool = True) -> dict:
    """`rlhf-ds train`: returns the run summary (also written to OUTPUT_DIR/summary.json)."""
    started = time.time()
    cfg = with_warm_start(cfg, log)
    os.makedirs(cfg.trainer.output_dir, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        cfg.save(os.path.join(cfg.trainer.output_dir, "config.yaml"))
    trainer, runner = _setup(cfg, show_progress)
    try:
        summary = trainer.fit()
        final = os.path.join(cfg.trainer.output_dir, "actor_hf")
        trainer.roles.actor.run_all("export_hf", final)
        summary.update(total_wall_time_s=round(time.time() - started, 1), actor_hf=final)
        return summary
    finally:
        if runner is not None:
            runner.close()
        trainer.roles.shutdown()


def measure_matmul_peak(seconds: float = 1.0, size: int = 1024) -> float:
    """FLOP/s of fp32 square matmuls on every core of this host (the denominator of the bench's MFU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b   # warm-up
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            count += 1
        return 2 * size ** 3 * count / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def run_bench(cfg: Config, steps: int, log: Log = print, name: str = "grpo_tiny") -> dict:
    """A fixed GRPO workload: ``steps`` RL steps without evaluation or checkpoints; the first step is a
    warm-up and is left out of the medians."""
    trainer, runner = _setup(cfg, show_progress=False)
    try:
        num_params = trainer.roles.rollout.run_all("num_parameters")[0]
        rows = []
        for step in range(1, steps + 1):
            trainer.step = step
            rows.append(trainer.train_step(step))
            log(f"bench: step {step}/{steps} {rows[-1]['timing/step_s']:.2f} s")
    finally:
        if runner is not None:
            runner.close()
        trainer.roles.shutdown()
    measured = rows[1:] if len(rows) > 1 else rows
    med = lambda key: statistics.median(r[key] for r in measured)  # noqa: E731
    step_s = med("timing/step_s")
    stages = sorted(k[len("timing/"):-2] for k in measured[0] if k.startswith("timing/") and k != "timing/step_s")
    # 6 N FLOPs per trained token (forward 2N + backward 4N) for each trained model of this size.
    trained_models = 2 if cfg.needs_critic else 1
    train_flops = statistics.median(6 * num_params * r["perf/train_seq_tokens"] * trained_models / r["timing/train_s"]
                                    for r in measured)
    peak = measure_matmul_peak()
    return {"bench": name, "steps_measured": len(measured), "median_step_s": round(step_s, 4),
            "stage_share": {s: round(med(f"timing/{s}_s") / step_s, 3) for s in stages},
            "generated_tokens_per_s": round(statistics.median(
                r["perf/generated_tokens"] / r["timing/rollout_s"] for r in measured), 1),
            "training_tokens_per_s": round(statistics.median(
                r["perf/train_seq_tokens"] / r["timing/train_s"] for r in measured), 1),
            "train_flops_per_s": round(train_flops, 1), "matmul_peak_flops_per_s": round(peak, 1),
            "train_flops_fraction_of_peak": round(train_flops / peak, 5), "model_params": num_params}
