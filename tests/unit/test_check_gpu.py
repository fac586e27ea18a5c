"""`make check-gpu` cannot rot on machines without a GPU: its argument parsing, the checks it would run
for 1-8 GPUs (each config validated as the run validates it), and the shape of its verdict."""
import json

import pytest

from rlhf_ds.cli import main
from rlhf_ds.cli.check_gpu import LOGPROB_GAP_TOLERANCE, grpo_figures, grpo_ok, plan_checks, verdict


@pytest.mark.parametrize("gpus,names", [
    (1, ["tiny_ipc_sleep", "qwen_ipc_sleep", "decode_cuda_graphs", "decode_eager"]),
    (2, ["tiny_ipc_sleep", "tiny_nccl", "qwen_ipc_sleep", "qwen_nccl", "decode_cuda_graphs", "decode_eager"]),
])
def test_dry_run_prints_the_plan_with_validated_configs(capsys, gpus, names):
    assert main(["check-gpu", "--dry-run", "--gpus", str(gpus), "--steps", "20"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["dry_run"] is True and plan["gpus"] == gpus and plan["logprob_gap_tolerance"] == LOGPROB_GAP_TOLERANCE
    assert [c["name"] for c in plan["checks"]] == names
    by_name = {c["name"]: set(c["overrides"]) for c in plan["checks"]}
    for model in ("tiny", "qwen"):   # the real path: vLLM with CUDA graphs, bf16, 20 steps
        assert {"rollout.backend=vllm", "precision=bf16", "rollout.vllm.enforce_eager=false",
                "trainer.max_steps=20"} <= by_name[f"{model}_ipc_sleep"]
        assert {"cluster.colocate=true", "rollout.vllm.enable_sleep_mode=true"} <= by_name[f"{model}_ipc_sleep"]
        if gpus >= 2:
            assert "cluster.colocate=false" in by_name[f"{model}_nccl"]


def test_many_gpus_split_into_actor_ranks_and_engines():
    nccl = {c.name: c for c in plan_checks(8)}["qwen_nccl"]
    assert {"actor.num_ranks=4", "rollout.num_engines=4"} <= set(nccl.overrides)
    nccl = {c.name: c for c in plan_checks(3)}["tiny_nccl"]
    assert {"actor.num_ranks=1", "rollout.num_engines=2"} <= set(nccl.overrides)
    with pytest.raises(ValueError, match="at least 1 GPU"):
        plan_checks(0)


def test_without_a_gpu_it_says_so_and_exits_2(capsys):
    assert main(["check-gpu"]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err


def _rows(gaps):
    return [{"step": 0, "eval/accuracy": 0.0}] + [
        {"step": i + 1, "rollout/logprob_diff_mean": g, "rollout/logprob_diff_max": 10 * g, "timing/sync_s": 0.5,
         "timing/rollout_s": 2.0, "perf/generated_tokens": 1000.0, "timing/step_s": 4.0 + i,
         "memory/gpu_awake_gib": 30.0, "memory/gpu_asleep_gib": 6.0, "memory/actor_peak_gib": 12.0 + i}
        for i, g in enumerate(gaps)]


def test_figures_and_the_verdict_json():
    figures = grpo_figures(_rows([0.01, 0.02, 0.015]), param_bytes=2 * 10 ** 9)
    assert figures["steps"] == 3 and figures["logprob_gap_mean_per_sync"] == [0.01, 0.02, 0.015]
    assert figures["sync_seconds_per_gb"] == pytest.approx(0.25)   # 0.5 s per sync of 2 GB
    assert figures["gpu_memory_gib"] == {"engines_awake": 30.0, "engines_asleep": 6.0, "actor_peak": 14.0}
    assert figures["rollout_tokens_per_s"] == pytest.approx(500.0) and figures["step_seconds_median"] == 5.0
    assert grpo_ok(figures)
    stale = grpo_figures(_rows([0.01, 0.4, 0.9]), param_bytes=2 * 10 ** 9)   # engines left on old weights
    assert not grpo_ok(stale)
    report = verdict({"tiny_ipc_sleep": {"ok": True, "seconds": 61.0, **figures},
                      "decode_cuda_graphs": {"ok": True, "seconds": 40.0, "tokens_per_s": 9000},
                      "decode_eager": {"ok": False, "seconds": 3.0, "error": "Traceback ...\nRuntimeError: boom"}},
                     gpus=1, device="NVIDIA H100", versions={"torch": "2.13.0"})
    assert report["ok"] is False and report["failed"] == ["decode_eager"]
    assert set(report) == {"ok", "failed", "gpus", "device", "versions", "logprob_gap_tolerance",
                           "cuda_graph_decode_speedup", "checks"}
    assert report["cuda_graph_decode_speedup"] is None   # one side failed: no ratio
    assert "RuntimeError: boom" in report["checks"]["decode_eager"]["error"]
    both = verdict({"decode_cuda_graphs": {"ok": True, "tokens_per_s": 9000},
                    "decode_eager": {"ok": True, "tokens_per_s": 3000}}, 1, "GPU", {})
    assert both["ok"] and both["cuda_graph_decode_speedup"] == 3.0
    json.dumps(report)   # one JSON object
