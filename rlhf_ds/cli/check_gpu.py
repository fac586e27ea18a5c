"""`rlhf-ds check-gpu` (`make check-gpu`): the GPU path end to end on a machine with 1-8 GPUs, in about
10 minutes, with one JSON verdict.

What runs is what a user's GPU run runs: Ray, a ZeRO-3 actor in bf16, vLLM engines with CUDA graphs,
20 GRPO steps per check on two models: the tiny Llama the CPU recipes use, and a model shaped like
Qwen2.5-0.5B with random weights (built locally from its config, nothing downloaded):

- ``*_ipc_sleep``: actor and engine colocated on GPU 0, vLLM's sleep mode, weights over CUDA IPC;
- ``*_nccl`` (2 GPUs or more): actor ranks and engines on GPUs of their own, weights over NCCL;
- ``decode_cuda_graphs``, ``decode_eager``: one engine's decode tokens/s with CUDA graphs and without
  (``enforce_eager``), each engine in a process of its own; the verdict gives their ratio.

Each check runs in a process of its own (a crash, a hang or an out-of-memory ends that check only) and
reports: the log-prob gap between the engines and the actor after every sync, the sync's seconds per GB,
GPU memory before and after the engines sleep and the actor's peak, tokens/s, and the traceback of
whatever failed. ``--dry-run`` prints the plan (which checks, their configs, validated) without a GPU.

The log-prob gap's tolerance: both sides compute in bf16 (8 mantissa bits: logits of magnitude ~10 are
rounded by ~0.04), with different kernels (vLLM's fused attention and sampler against the model's eager
forward under DeepSpeed), so single tokens differ by up to a few tenths; the mean over a step's tokens
stays under ``LOGPROB_GAP_TOLERANCE`` when the engines serve the actor's weights. A sync that failed
silently leaves the engines on older weights, which at the checks' learning rate moves the mean well
past it within a few steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from rlhf_ds.cli.args import Command
from rlhf_ds.config import load_config
from rlhf_ds.plan.shapes import KNOWN_SHAPES, model_shape

LOGPROB_GAP_TOLERANCE = 0.05   # nats, mean |engine - actor| over a step's response tokens (bf16, see above)
QWEN_SHAPE = "qwen2.5-0.5b"
STEPS = 20
BUDGET_S = {"tiny": 150, "qwen": 240, "decode": 150}   # per check, before it is stopped
# the packages whose versions the verdict reports, with what each runs
_REPORTED_PACKAGES = {"vllm": "rollouts", "deepspeed": "ZeRO-3 engines", "ray": "the cluster",
                      "transformers": "the models"}


@dataclass(frozen=True)
class Check:
    name: str
    what: str
    kind: str                      # "grpo" (a training run) or "decode" (one engine's throughput)
    model: str                     # "tiny" or "qwen"
    overrides: tuple[str, ...]

    @property
    def budget_s(self) -> int:
        return BUDGET_S["decode" if self.kind == "decode" else self.model]


def _model_overrides(model: str, model_dir: str) -> list[str]:
    if model == "tiny":
        return ["actor.model_path=tiny:llama-arith", "actor.micro_batch_size=32"]
    return [f"actor.model_path={model_dir}", "actor.tokenizer_path=tiny:qwen2-bpe", "actor.micro_batch_size=16",
            "data.prompts_per_step=16", "rollout.n=4", "algo.mini_batch_size=64", "rollout.max_response_len=64"]


def plan_checks(gpus: int, steps: int = STEPS, workdir: str = "outputs/check_gpu", model_dir: str = "") -> list[Check]:
    """The checks for ``gpus`` GPUs. model_dir: the Qwen-shaped model's directory (built before running)."""
    if gpus < 1:
        raise ValueError(f"check-gpu needs at least 1 GPU, got --gpus {gpus}")
    model_dir = model_dir or f"{workdir}/random-{QWEN_SHAPE}"
    common = ["rollout.backend=vllm", "precision=bf16", "trainer.sft.steps=0", f"trainer.max_steps={steps}",
              "trainer.eval_interval=0", "trainer.save_interval=0", "data.num_eval=64", "actor.lr=1e-4",
              "rollout.vllm.enforce_eager=false", "rollout.vllm.kv_cache_memory_bytes=1073741824"]
    # NCCL: actor ranks (a power of two, for the batch to split evenly) and engines on GPUs of their own
    actor_ranks = 1 << max(0, (gpus // 2).bit_length() - 1)
    engines = min(gpus - actor_ranks, 4)
    checks = []
    for model in ("tiny", "qwen"):
        base = common + _model_overrides(model, model_dir)
        checks.append(Check(f"{model}_ipc_sleep", "actor and engine on GPU 0, sleep mode, CUDA IPC", "grpo", model,
                            tuple(base + ["cluster.colocate=true", "rollout.vllm.enable_sleep_mode=true",
                                          "actor.num_ranks=1", "rollout.num_engines=1",
                                          f"trainer.output_dir={workdir}/{model}_ipc_sleep"])))
        if gpus >= 2:
            checks.append(Check(f"{model}_nccl", f"{actor_ranks} actor rank(s) and {engines} engine(s) on GPUs of "
                                f"their own, NCCL", "grpo", model,
                                tuple(base + ["cluster.colocate=false", f"actor.num_ranks={actor_ranks}",
                                              f"rollout.num_engines={engines}",
                                              f"trainer.output_dir={workdir}/{model}_nccl"])))
    decode = common + _model_overrides("qwen", model_dir) + ["rollout.max_response_len=128",
                                                             "rollout.vllm.kv_cache_memory_bytes=0",
                                                             "rollout.vllm.gpu_memory_utilization=0.3"]
    for label, eager in (("cuda_graphs", "false"), ("eager", "true")):
        checks.append(Check(f"decode_{label}", f"one engine's decode tokens/s, enforce_eager={eager}", "decode", "qwen",
                            tuple(decode + [f"rollout.vllm.enforce_eager={eager}"])))
    return checks


# ----------------------------------------------------------------------------- figures (pure)

def grpo_figures(rows: list[dict], param_bytes: int) -> dict[str, Any]:
    """The check's figures from a run's metrics rows (metrics.jsonl): the log-prob gap at every step (the
    weights of the sync before it), sync seconds per GB, GPU memory, tokens/s."""
    steps = [r for r in rows if r.get("step", 0) >= 1]
    gaps = [r["rollout/logprob_diff_mean"] for r in steps if "rollout/logprob_diff_mean" in r]
    sync_s = [r["timing/sync_s"] for r in steps if "timing/sync_s" in r]
    rollout_s = sum(r.get("timing/rollout_s", 0.0) for r in steps)

    def worst(key: str) -> Optional[float]:
        values = [r[key] for r in steps if key in r]
        return max(values) if values else None

    return {
        "steps": len(steps),
        "logprob_gap_mean_per_sync": gaps,
        "logprob_gap_max_per_sync": [r["rollout/logprob_diff_max"] for r in steps if "rollout/logprob_diff_max" in r],
        "sync_seconds_per_gb": (sum(sync_s) / len(sync_s)) / (param_bytes / 1e9) if sync_s and param_bytes else None,
        "gpu_memory_gib": {"engines_awake": worst("memory/gpu_awake_gib"),
                           "engines_asleep": worst("memory/gpu_asleep_gib"),
                           "actor_peak": worst("memory/actor_peak_gib")},
        "rollout_tokens_per_s": sum(r.get("perf/generated_tokens", 0.0) for r in steps) / rollout_s if rollout_s else None,
        "step_seconds_median": sorted(r["timing/step_s"] for r in steps)[len(steps) // 2] if steps else None,
    }


def grpo_ok(figures: dict) -> bool:
    gaps = figures["logprob_gap_mean_per_sync"]
    return bool(gaps) and len(gaps) == figures["steps"] and max(gaps) < LOGPROB_GAP_TOLERANCE


def verdict(results: dict[str, dict], gpus: int, device: str, versions: dict[str, str]) -> dict[str, Any]:
    """The one JSON object ``make check-gpu`` ends with. results: check name -> {ok, seconds, error, ...}."""
    failed = [name for name, result in results.items() if not result.get("ok")]
    graphs, eager = results.get("decode_cuda_graphs", {}), results.get("decode_eager", {})
    speedup = (round(graphs["tokens_per_s"] / eager["tokens_per_s"], 2)
               if graphs.get("ok") and eager.get("ok") else None)
    return {"ok": not failed, "failed": failed, "gpus": gpus, "device": device, "versions": versions,
            "logprob_gap_tolerance": LOGPROB_GAP_TOLERANCE, "cuda_graph_decode_speedup": speedup, "checks": results}


# ----------------------------------------------------------------------------- running one check

def build_random_model(shape: str, directory: str) -> str:
    """A model of a known architecture's shape with random bf16 weights, saved once to ``directory``."""
    import torch  # torch: loaded when first needed

    # transformers: loaded when first needed
    from transformers import AutoConfig, AutoModelForCausalLM

    marker = Path(directory) / ".complete"
    if marker.exists():
        return directory
    fields = dict(KNOWN_SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    marker.write_text(shape)
    return directory


def _run_grpo(check: Check) -> dict[str, Any]:
    # transformers: loaded when first needed
    from rlhf_ds.trainer.run import run_training

    cfg = load_config("grpo_tiny", list(check.overrides))
    summary = run_training(cfg, log=lambda *_: None, show_progress=False)
    with open(os.path.join(cfg.trainer.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    figures = grpo_figures(rows, _param_bytes(cfg.actor.model_path))
    return {"ok": grpo_ok(figures), **figures, "wall_s": summary.get("total_wall_time_s")}


def _param_bytes(model_path: str) -> int:
    return model_shape(model_path).num_params * 2   # bf16


def _run_decode(check: Check) -> dict[str, Any]:
    from rlhf_ds.rollout.base import SamplingParams  # torch: loaded when first needed

    # transformers: loaded when first needed
    from rlhf_ds.rollout.vllm_engine import VLLMRolloutEngine

    cfg = load_config("grpo_tiny", list(check.overrides))
    engine = VLLMRolloutEngine(cfg, in_process=True)
    prompts = [[100 + (7 * i + j) % 300 for j in range(16)] for i in range(128)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=cfg.rollout.max_response_len, ignore_eos=True)
    engine.generate(prompts, 1, sampling, seed=0)   # warm-up (and graph capture)
    measured = []
    for repeat in range(3):
        t0 = time.perf_counter()
        samples = engine.generate(prompts, 1, sampling, seed=repeat + 1)
        measured.append(sum(len(s.response) for s in samples) / (time.perf_counter() - t0))
    engine.shutdown()
    rate = sorted(measured)[1]
    return {"ok": rate > 0, "tokens_per_s": round(rate)}


def run_one(check: Check, result_path: str) -> int:
    """In the check's own process: run it, write its result (with the traceback if it failed)."""
    t0 = time.perf_counter()
    try:
        result = _run_grpo(check) if check.kind == "grpo" else _run_decode(check)
    except Exception:  # noqa: BLE001 - every failure becomes part of the verdict
        result = {"ok": False, "error": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(result_path).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


def _in_subprocess(check: Check, gpus: int, steps: int, workdir: str) -> dict[str, Any]:
    result_path = Path(workdir) / f"{check.name}.result.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "rlhf_ds.cli", "check-gpu", "--gpus", str(gpus), "--steps", str(steps),
               "--workdir", workdir, "--run-one", check.name, "--result", str(result_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=check.budget_s)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-4000:]
        return {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                "error": f"stopped after {check.budget_s} s; output ends:\n"
                         f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}"}
    if result_path.exists():
        return json.loads(result_path.read_text())
    return {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
            "error": f"exited with status {proc.returncode} before writing a result; output ends:\n"
                     f"{proc.stderr[-4000:]}"}


def _environment() -> tuple[int, str, dict[str, str]]:
    import torch  # torch: loaded when first needed

    versions = {"torch": str(torch.__version__)}
    for package in _REPORTED_PACKAGES:
        try:
            versions[package] = str(__import__(package).__version__)
        except ImportError:
            versions[package] = "missing"
    count = torch.cuda.device_count()
    return count, torch.cuda.get_device_name(0) if count else "no CUDA device", versions


# ----------------------------------------------------------------------------- the command

def _add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the plan (checks, configs) and exit; no GPU")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: every visible one; with "
                                                            "--dry-run: 1)")
    parser.add_argument("--steps", type=int, default=STEPS, help="GRPO steps per check")
    parser.add_argument("--workdir", default="outputs/check_gpu", help="runs, the random model and the verdict")
    parser.add_argument("--only", nargs="*", default=None, help="run these checks only (names from --dry-run)")
    parser.add_argument("--run-one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)


def _run(ns: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if ns.dry_run:
        return _dry_run(ns)
    count, device, versions = _environment()
    if count == 0:
        print("rlhf-ds check-gpu: no CUDA device visible (nvidia-smi, CUDA_VISIBLE_DEVICES); `--dry-run` prints "
              "the plan without one", file=sys.stderr)
        return 2
    gpus = min(ns.gpus or count, count, 8)
    checks = {c.name: c for c in plan_checks(gpus, ns.steps, ns.workdir, f"{ns.workdir}/random-{QWEN_SHAPE}")}
    if ns.run_one:
        return run_one(checks[ns.run_one], ns.result)
    unknown = sorted(set(ns.only or ()) - set(checks))
    if unknown:
        print(f"rlhf-ds check-gpu: no check named {unknown}; checks: {', '.join(checks)}", file=sys.stderr)
        return 2
    os.makedirs(ns.workdir, exist_ok=True)
    build_random_model(QWEN_SHAPE, f"{ns.workdir}/random-{QWEN_SHAPE}")
    results = {}
    for name, check in checks.items():
        if ns.only is not None and name not in ns.only:
            continue
        print(f"check-gpu: {name}: {check.what} ...", flush=True)
        results[name] = _in_subprocess(check, gpus, ns.steps, ns.workdir)
        print(f"check-gpu: {name}: {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['seconds']} s",
              flush=True)
    report = verdict(results, gpus, device, versions)
    Path(ns.workdir, "verdict.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def _dry_run(ns: argparse.Namespace) -> int:
    """The plan, each check's config validated as the run would validate it."""
    gpus = ns.gpus or 1
    checks = plan_checks(gpus, ns.steps, ns.workdir)
    for check in checks:
        load_config("grpo_tiny", list(check.overrides))
    print(json.dumps({"dry_run": True, "gpus": gpus, "steps": ns.steps, "logprob_gap_tolerance": LOGPROB_GAP_TOLERANCE,
                      "checks": [asdict(c) for c in checks]}))
    return 0


CHECK_COMMANDS = {
    "check-gpu": Command("the GPU path end to end on 1-8 GPUs (Ray, ZeRO-3 in bf16, vLLM with CUDA graphs, sleep "
                         "mode, IPC / NCCL sync): one JSON verdict; --dry-run prints the plan", _add, _run),
}
