"""`rlhf-ds train|sft|rm|bench`: the commands that start work. Heavy imports (torch, ray, deepspeed) stay
inside the run functions, so `rlhf-ds --help` and `rlhf-ds config ...` stay fast."""
from __future__ import annotations

import argparse
import json
import os

from rlhf_ds.bench import BENCH_MODELS, compare_with_floor, format_table, measure_matmul_peak, run_bench
from rlhf_ds.choices import Stage
from rlhf_ds.cli.args import Command, add_config_arguments, config_from_args, split_config_args
from rlhf_ds.env import process_rank
from rlhf_ds.plan.report import check_fits


def _add(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")


def _config(ns: argparse.Namespace, stage: Stage = "rl"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # one thread per process (docs/design.md#threads-on-a-2-core-host)
    return config_from_args(ns, stage)


def _run_train(ns: argparse.Namespace) -> int:
    # transformers: loaded when first needed
    from rlhf_ds.trainer.run import run_training

    summary = run_training(_config(ns), show_progress=not ns.no_progress)
    first, last = summary.get("first_eval"), summary.get("last_eval")
    if first and last and process_rank() == 0:
        print(f"held-out accuracy {first['accuracy']:.3f} (step {first['step']}) -> {last['accuracy']:.3f} "
              f"(step {last['step']}); total {summary['total_wall_time_s']:.0f} s; final actor: "
              f"{summary['actor_hf']}")
    return 0


def _stage_line(summary: dict, what: str) -> str:
    first, last = summary.get("first_eval"), summary.get("last_eval")
    line = f"{summary.get('eval_key', 'eval')}"
    if first and last:
        line += f" {first['accuracy']:.3f} (step {first['step']}) -> {last['accuracy']:.3f} (step {last['step']})"
    return f"{line}; total {summary['total_wall_time_s']:.0f} s; {what}: {summary['export']}"


def _run_stage(ns: argparse.Namespace, stage: Stage) -> int:
    """`sft` / `rm`: one supervised stage (``trainer.sft`` / ``trainer.rm``), checked to fit first."""
    # the stages load torch, transformers and deepspeed: imported only when one runs
    from rlhf_ds.trainer.rm_stage import run_rm_stage
    from rlhf_ds.trainer.sft_stage import run_sft_stage

    cfg = _config(ns, stage)
    if getattr(cfg.trainer, stage).steps == 0:
        print(f"trainer.{stage}.steps=0: nothing to train")
        return 0
    check_fits(cfg, stage=stage)   # before any engine starts
    run, trained = {"sft": (run_sft_stage, "final actor"),
                    "rm": (run_rm_stage, "reward model (reward.model_path)")}[stage]
    summary = run(cfg, show_progress=not ns.no_progress, log=print if process_rank() == 0 else (lambda *_: None))
    if process_rank() == 0:
        print("held-out " + _stage_line(summary, trained))
    return 0


def _add_bench(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=0,
                        help="with CONFIG: RL steps to time (default 11, the first a warm-up); without: steps per "
                             "round of each side (default 5)")
    parser.add_argument("--models", default="tiny,small", help="without CONFIG: models to compare (tiny, small)")
    parser.add_argument("--backends", default="hf,vllm", help="without CONFIG: rollout backends to compare")
    parser.add_argument("--rounds", type=int, default=3, help="without CONFIG: floor / ours alternations")


def _run_bench(ns: argparse.Namespace) -> int:
    """`bench CONFIG [k=v ...]`: time that config alone. `bench [k=v ...]`: the fixed workload against the
    single-process floor, every model and backend (``rlhf_ds.bench``); overrides apply to our side."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    name, overrides = split_config_args(ns.config_args)
    if name is not None:
        result = run_bench(_config(ns), ns.steps or 11, log=lambda line: print(line, flush=True), name=name)
        print(json.dumps(result))
        return 0
    models, backends = ns.models.split(","), ns.backends.split(",")
    unknown = [m for m in models if m not in BENCH_MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; valid: {', '.join(BENCH_MODELS)}")
    peak = measure_matmul_peak()
    results = []
    for model in models:
        for backend in backends:
            results.append(compare_with_floor(model, backend, ns.rounds, ns.steps or 5,
                                              os.path.join("outputs", "bench", f"{model}_{backend}"),
                                              tuple(overrides), log=lambda line: print(line, flush=True),
                                              peak=peak))
            print(json.dumps(results[-1]), flush=True)
    print(format_table(results))
    return 0


def _add_pairs(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for train.jsonl, eval.jsonl and summary.json")
    parser.add_argument("--pairs-per-prompt", type=int, default=2, help="pairs at most per prompt (default 2)")
    parser.add_argument("--num-train", type=int, default=0, help="train prompts to sample (default: all)")


def _run_pairs(ns: argparse.Namespace) -> int:
    # transformers: loaded when first needed
    from rlhf_ds.trainer.pairs import run_pairs

    summary = run_pairs(_config(ns), ns.out, pairs_per_prompt=ns.pairs_per_prompt, num_train=ns.num_train)
    for split in ("train", "eval"):
        s = summary[split]
        print(f"pairs: {split}: {s['pairs']} pairs from {s['samples']} samples ({s['correct']:.1%} correct) "
              f"-> {s['path']}")
    return 0


RUN_COMMANDS = {
    "train": Command("run RL training: `train [CONFIG] [key=value ...]` (SFT warm start first when "
                     "trainer.sft.steps > 0, cached)", _add, _run_train),
    "sft": Command("supervised fine-tuning of the actor on ZeRO-3 engines: `sft [CONFIG] [key=value ...]` "
                   "(trainer.sft; the trained actor goes to OUTPUT_DIR/actor_hf)", _add,
                   lambda ns: _run_stage(ns, "sft")),
    "rm": Command("reward-model training on preference pairs: `rm [CONFIG] [key=value ...]` (trainer.rm; the "
                  "model goes to OUTPUT_DIR/reward_hf, for reward.model_path)", _add,
                  lambda ns: _run_stage(ns, "rm")),
    "pairs": Command("preference pairs from the actor's own samples, labelled by the rule rewards: `pairs [CONFIG] "
                     "[key=value ...] --out DIR` (JSONL for `rm`: data.train_path / data.eval_path)",
                     _add_pairs, _run_pairs),
    "bench": Command("our GRPO step against a single-process floor on a fixed workload (tiny and small models, "
                     "each backend), or `bench CONFIG` to time one config", _add_bench, _run_bench),
}
