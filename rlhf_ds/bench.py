"""The benchmark workload: a fixed number of RL steps of a config, timed stage by stage (``rlhf-ds bench``)."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

from rlhf_ds.config import Config


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


def run_bench(cfg: Config, steps: int, log: Callable[[str], None] = print, name: str = "grpo_tiny") -> dict:
    """A fixed GRPO workload: ``steps`` RL steps without evaluation or checkpoints; the first step is a
    warm-up and is left out of the medians."""
    from rlhf_ds.trainer.run import build_trainer

    trainer, runner = build_trainer(cfg, show_progress=False)
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
