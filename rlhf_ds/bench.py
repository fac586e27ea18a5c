"""``make bench``: our GRPO step against the floor (``bench_floor``), on the same work, in one invocation.

Workload (the issue's): 8 prompts x 4 samples, 32 new tokens with ``ignore_eos`` (identical work on both
sides), fp32, one optimizer step per rollout batch, no KL, on two Llama models built locally: *tiny*
(~135 K parameters) and *small* (~6.3 M). For each model and rollout backend our trainer is started once,
then ``rounds`` times: ``steps`` floor steps, then ``steps`` of ours; medians per round, the ratio of
the round medians, and their spread across rounds. Machines here are shared and noisy: only ratios
measured side by side mean much.

``run_bench(cfg, steps)`` times one config alone (``rlhf-ds bench CONFIG``).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional

from rlhf_ds.config import Config, load_config
from rlhf_ds.data.prompts import load_run_records

BENCH_MODELS = {"tiny": "tiny:llama-arith", "small": "tiny:llama-small"}
BENCH_PROMPTS, BENCH_SAMPLES, BENCH_NEW_TOKENS = 8, 4, 32


def measure_matmul_peak(seconds: float = 1.0, size: int = 1024) -> float:
    """FLOP/s of fp32 square matmuls on every core of this host (the denominator of the bench's MFU)."""
    import torch  # torch: loaded when first needed

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        _ = a @ b   # warm-up
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _ = a @ b
            count += 1
        return 2 * size ** 3 * count / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def bench_config(model: str, backend: str, output_dir: str, overrides: tuple[str, ...] = ()) -> Config:
    """The fixed workload on ``model`` (a key of BENCH_MODELS) with ``backend``; extra overrides last."""
    total = BENCH_PROMPTS * BENCH_SAMPLES
    return load_config("grpo_tiny", [
        f"actor.model_path={BENCH_MODELS[model]}", "trainer.sft.steps=0", "precision=fp32",
        f"data.prompts_per_step={BENCH_PROMPTS}", f"rollout.n={BENCH_SAMPLES}",
        f"rollout.max_response_len={BENCH_NEW_TOKENS}", "rollout.ignore_eos=true", f"rollout.backend={backend}",
        f"algo.mini_batch_size={total}", f"actor.micro_batch_size={total}", "algo.kl_placement=none",
        "trainer.eval_interval=0", "trainer.save_interval=0", f"trainer.output_dir={output_dir}", *overrides])


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float]) -> list[float]:
    return [round(min(values), 4), round(max(values), 4)]


def _our_steps(trainer, first_step: int, count: int) -> list[dict]:
    rows = []
    for step in range(first_step, first_step + count):
        trainer.step = step
        rows.append(trainer.train_step(step))
    return rows


def _floor_steps(floor, records: list, first_step: int, count: int) -> list:
    rows = []
    for step in range(first_step, first_step + count):
        batch = records[(step * BENCH_PROMPTS) % (len(records) - BENCH_PROMPTS):][:BENCH_PROMPTS]
        rows.append(floor.step([r.prompt for r in batch], [r.answer for r in batch], BENCH_SAMPLES,
                               BENCH_NEW_TOKENS, seed=step))
    return rows


def compare_with_floor(model: str, backend: str, rounds: int, steps: int, output_dir: str,
                       overrides: tuple[str, ...] = (), log: Callable[[str], None] = print,
                       peak: float = 0.0) -> dict:
    """Alternate floor and ours ``rounds`` times, ``steps`` steps each (after one warm-up step of each)."""
    from rlhf_ds.bench_floor import FloorLoop  # torch: loaded when first needed

    # transformers: loaded when first needed
    from rlhf_ds.trainer.run import build_trainer

    cfg = bench_config(model, backend, output_dir, overrides)
    floor = FloorLoop(cfg.actor.model_path, cfg.actor.lr)
    records = list(_train_records(cfg))
    trainer, runner = build_trainer(cfg, show_progress=False)
    try:
        num_params = floor.num_parameters()
        _floor_steps(floor, records, 0, 1)
        _our_steps(trainer, 1, 1)   # warm-ups: first calls compile / allocate
        ours_by_round, floor_by_round = [], []
        for r in range(rounds):
            floor_by_round.append(_floor_steps(floor, records, 2 + r * steps, steps))
            ours_by_round.append(_our_steps(trainer, 2 + r * steps, steps))
            trainer.finish_ahead()   # asynchronous generation: no batch runs into the floor's timing
            log(f"bench {model}/{backend}: round {r + 1}/{rounds}: ours "
                f"{_median([x['timing/step_s'] for x in ours_by_round[-1]]):.3f} s, floor "
                f"{_median([x.step_s for x in floor_by_round[-1]]):.3f} s")
    finally:
        if runner is not None:
            runner.close()
        trainer.roles.shutdown()
    return _summary(model, backend, ours_by_round, floor_by_round, num_params, peak or measure_matmul_peak(),
                    asynchronous=cfg.rollout.async_generation)


def _summary(model: str, backend: str, ours_by_round: list[list[dict]], floor_by_round: list[list],
             num_params: int, peak: float, asynchronous: bool = False) -> dict:
    ours = [row for rnd in ours_by_round for row in rnd]
    floor = [row for rnd in floor_by_round for row in rnd]
    ours_round = [_median([x["timing/step_s"] for x in rnd]) for rnd in ours_by_round]
    floor_round = [_median([x.step_s for x in rnd]) for rnd in floor_by_round]
    ratios = [o / f for o, f in zip(ours_round, floor_round, strict=True)]
    step_s = _median([x["timing/step_s"] for x in ours])
    stages = sorted(k[len("timing/"):-2] for k in ours[0] if k.startswith("timing/") and k != "timing/step_s")
    flops = 6 * num_params   # per trained token: forward 2N + backward 4N
    return {
        "model": model, "backend": backend + ("+async" if asynchronous else ""), "model_params": num_params,
        "rounds": len(ours_by_round),
        "ours_step_s": round(step_s, 4), "ours_step_s_spread": _spread(ours_round),
        "floor_step_s": round(_median([x.step_s for x in floor]), 4), "floor_step_s_spread": _spread(floor_round),
        "ratio": round(_median(ratios), 3), "ratio_spread": _spread(ratios),
        "stage_share": {s: round(_median([x.get(f"timing/{s}_s", 0.0) for x in ours]) / step_s, 3) for s in stages},
        # asynchronous generation overlaps training: timing/rollout_s is then only the wait, not a rate
        "ours_rollout_tokens_per_s": (None if asynchronous else
                                      round(_median([x["perf/generated_tokens"] / x["timing/rollout_s"] for x in ours]))),
        "floor_generate_tokens_per_s": round(_median([x.generated_tokens / x.generate_s for x in floor])),
        "ours_train_fraction_of_peak": round(_median(
            [flops * x["perf/train_seq_tokens"] / x["timing/train_s"] for x in ours]) / peak, 4),
        "floor_train_fraction_of_peak": round(_median(
            [flops * x.train_seq_tokens / x.train_s for x in floor]) / peak, 4),
        "matmul_peak_flops_per_s": round(peak),
    }


def _train_records(cfg: Config):
    return load_run_records(cfg.data)[0][:4096]


def _rate(tokens_per_s: Optional[int]) -> str:
    return "overlap" if tokens_per_s is None else str(tokens_per_s)


def format_table(results: list[dict]) -> str:
    head = (f"{'model':6} {'backend':9} {'ours s':>8} {'floor s':>8} {'ratio':>6} {'ratio spread':>14} "
            f"{'tok/s ours':>10} {'tok/s floor':>11} {'train %peak':>12}  stage shares")
    lines = [head]
    for r in results:
        shares = " ".join(f"{k}={v:.2f}" for k, v in r["stage_share"].items() if v >= 0.01)
        lines.append(f"{r['model']:6} {r['backend']:9} {r['ours_step_s']:8.3f} {r['floor_step_s']:8.3f} "
                     f"{r['ratio']:6.2f} {str(r['ratio_spread']):>14} {_rate(r['ours_rollout_tokens_per_s']):>10} "
                     f"{r['floor_generate_tokens_per_s']:11d} "
                     f"{100 * r['ours_train_fraction_of_peak']:5.1f}/{100 * r['floor_train_fraction_of_peak']:4.1f}%"
                     f"  {shares}")
    return "\n".join(lines)


def run_bench(cfg: Config, steps: int, log: Callable[[str], None] = print, name: str = "grpo_tiny") -> dict:
    """A fixed GRPO workload: ``steps`` RL steps without evaluation or checkpoints; the first step is a
    warm-up and is left out of the medians."""
    # transformers: loaded when first needed
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
