"""`rlhf-ds train|sft|bench`: the commands that start work. Heavy imports (torch, ray, deepspeed) stay
inside the run functions, so `rlhf-ds --help` and `rlhf-ds config ...` stay fast."""
from __future__ import annotations

import argparse
import json
import os

from rlhf_ds.cli.args import Command, add_config_arguments, config_from_args, split_config_args
from rlhf_ds.config import DEFAULT_RECIPE


def _add(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")


def _config(ns: argparse.Namespace):
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # every worker process: one thread (see DESIGN.md)
    return config_from_args(ns)


def _run_train(ns: argparse.Namespace) -> int:
    from rlhf_ds.cluster.env import process_rank
    from rlhf_ds.trainer.run import run_training

    summary = run_training(_config(ns), show_progress=not ns.no_progress)
    first, last = summary.get("first_eval"), summary.get("last_eval")
    if first and last and process_rank() == 0:
        print(f"held-out accuracy {first['accuracy']:.3f} (step {first['step']}) -> {last['accuracy']:.3f} "
              f"(step {last['step']}); total {summary['total_wall_time_s']:.0f} s; final actor: "
              f"{summary['actor_hf']}")
    return 0


def _run_sft(ns: argparse.Namespace) -> int:
    from rlhf_ds.trainer.sft_trainer import run_sft

    cfg = _config(ns)
    if cfg.trainer.sft.steps == 0:
        print("trainer.sft.steps=0: no warm start configured")
        return 0
    print(run_sft(cfg))
    return 0


def _add_bench(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=11, help="RL steps to time (the first is a warm-up)")


def _run_bench(ns: argparse.Namespace) -> int:
    from rlhf_ds.bench import run_bench

    cfg = _config(ns)
    name = split_config_args(ns.config_args)[0] or DEFAULT_RECIPE
    result = run_bench(cfg, ns.steps, log=lambda line: print(line, flush=True), name=name)
    print(json.dumps(result))
    return 0


RUN_COMMANDS = {
    "train": Command("run RL training: `train [CONFIG] [key=value ...]` (SFT warm start first when "
                     "trainer.sft.steps > 0, cached)", _add, _run_train),
    "sft": Command("run (or reuse) the SFT warm start of CONFIG and print its directory", _add, _run_sft),
    "bench": Command("time a fixed GRPO workload and print one JSON line", _add_bench, _run_bench),
}
