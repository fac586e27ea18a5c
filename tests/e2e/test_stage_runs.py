"""The SFT and reward-model stages end to end under Ray (tiny models, a few steps): metrics, checkpoints,
resume, HF exports that RL configs accept, and the RL warm start through the SFT stage (cached)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ds.config import load_config
from rlhf_ds.models.files import check_reward_head
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.trainer.checkpoint import latest_checkpoint
from rlhf_ds.trainer.rm_stage import run_rm_stage
from rlhf_ds.trainer.sft_stage import run_sft_stage

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUIET = {"log": lambda *_: None, "show_progress": False}
SFT = ["actor.model_path=tiny:llama-micro", "actor.num_ranks=2", "actor.micro_batch_size=4", "trainer.sft.batch_size=16",
       "trainer.sft.eval_interval=2", "trainer.sft.save_interval=2", "data.num_eval=16", "rollout.max_response_len=8"]
RM = ["reward.model_path=tiny:llama-micro-value", "reward.micro_batch_size=4", "trainer.rm.batch_size=8",
      "trainer.rm.eval_interval=2", "trainer.rm.save_interval=2", "data.num_eval=16"]


def _rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _max_change(start_dir, final_dir):
    start, final = (load_file(os.path.join(d, "model.safetensors")) for d in (start_dir, final_dir))
    assert start.keys() == final.keys()
    return max((final[k] - start[k]).abs().max().item() for k in start)


def test_sft_stage_on_two_ranks_then_resume(ray_session, tmp_path):
    out = str(tmp_path / "sft")
    summary = run_sft_stage(load_config("sft_tiny", SFT + ["trainer.sft.steps=3", f"trainer.output_dir={out}"]), **QUIET)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all("eval/accuracy" in rows[s] for s in (0, 2, 3)) and "eval/accuracy" not in rows[1]
    for row in rows[1:]:
        assert row["sft/loss"] > 0 and row["sft/grad_norm"] > 0 and row["sft/skipped"] == 0
    assert rows[1]["sft/loss"] > rows[3]["sft/loss"]   # lr 3e-3 on a fresh model: the loss drops at once
    assert summary["first_eval"]["step"] == 0 and summary["last_eval"]["step"] == 3
    assert latest_checkpoint(out).endswith("step_3")
    assert _max_change(resolve_model_path("tiny:llama-micro"), summary["export"]) > 1e-4
    assert summary["export"] == os.path.join(out, "actor_hf")
    for name in ("summary.json", "config.yaml", "ds_config_actor.json", "tensorboard"):
        assert os.path.exists(os.path.join(out, name)), name
    # the export is an actor.model_path an RL config accepts
    assert load_config("grpo_tiny", [f"actor.model_path={summary['export']}"]).actor.model_path == summary["export"]

    resumed = run_sft_stage(load_config("sft_tiny", SFT + ["trainer.sft.steps=5", f"trainer.output_dir={out}",
                                                           "trainer.resume=true"]), **QUIET)
    rows = _rows(out)
    assert resumed["resumed_from"].endswith("step_3")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]   # the first run's lines kept, no step repeated
    assert rows[-1]["data/position"] == 5 * 16

    # ... and lands where an uninterrupted 5-step run does (same data order, restored optimizer state)
    straight = str(tmp_path / "straight")
    run_sft_stage(load_config("sft_tiny", SFT + ["trainer.sft.steps=5", f"trainer.output_dir={straight}"]), **QUIET)
    assert _max_change(os.path.join(straight, "actor_hf"), resumed["export"]) < 1e-6


def test_reward_model_stage_then_resume(ray_session, tmp_path):
    out = str(tmp_path / "rm")
    summary = run_rm_stage(load_config("rm_tiny", RM + ["trainer.rm.steps=3", f"trainer.output_dir={out}"]), **QUIET)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["eval/pairwise_accuracy"] == 0.5           # zero head: every pair ties
    assert 0.0 <= rows[3]["eval/pairwise_accuracy"] <= 1.0 and "eval/pairwise_loss" in rows[3]
    assert rows[1]["rm/loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    assert rows[2]["rm/grad_norm"] > 0
    assert summary["eval_key"] == "eval/pairwise_accuracy" and summary["last_eval"]["step"] == 3
    export = summary["export"]
    assert export == os.path.join(out, "reward_hf") and os.path.exists(os.path.join(out, "ds_config_reward.json"))
    check_reward_head(export, "reward.model_path")           # what an RL run checks before it starts
    head = load_file(os.path.join(export, "model.safetensors"))["value_head.weight"]
    assert head.abs().max() > 0                               # trained away from its zero start
    cfg = load_config("ppo_tiny_rm", [f"reward.model_path={export}"])
    assert cfg.uses_reward_model and cfg.reward.model_path == export

    resumed = run_rm_stage(load_config("rm_tiny", RM + ["trainer.rm.steps=4", f"trainer.output_dir={out}",
                                                        "trainer.resume=true"]), **QUIET)
    assert resumed["resumed_from"].endswith("step_3")
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3, 4]
    assert latest_checkpoint(out).endswith("step_4")


def test_rl_warm_start_runs_the_sft_stage_once_and_caches_it(ray_session, tmp_path, monkeypatch):
    from rlhf_ds.trainer import warm_start
    from rlhf_ds.trainer.warm_start import with_warm_start

    monkeypatch.setattr(warm_start, "default_cache_dir", lambda: tmp_path / "cache")
    out = str(tmp_path / "grpo")
    cfg = load_config("grpo_tiny", SFT + ["actor.num_ranks=1", "trainer.sft.steps=50", "trainer.sft.eval_interval=1",
                                          "trainer.sft.target_eval_accuracy=0.0", f"trainer.output_dir={out}"])
    lines = []
    warm = with_warm_start(cfg, log=lines.append)
    cached = str(warm_start.sft_dir(cfg))
    assert warm.actor.model_path == cached and warm.trainer.sft.steps == 0
    # stopped at the target (reached at the first evaluation after a step), without checkpoints
    rows = _rows(os.path.join(out, "sft"))
    assert [r["step"] for r in rows] == [0, 1]
    assert not os.path.exists(os.path.join(out, "sft", "checkpoints"))
    assert (tmp_path / "cache" / "sft").exists() and "1 steps" in open(os.path.join(cached, warm_start.MARKER)).read()
    assert _max_change(resolve_model_path("tiny:llama-micro"), cached) > 1e-4
    # the second time, the cached result is reused at once
    lines.clear()
    assert with_warm_start(cfg, log=lines.append).actor.model_path == cached
    assert any("reusing" in line for line in lines)
