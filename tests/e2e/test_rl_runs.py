"""GRPO and PPO end to end under Ray: every role in use, actor on 2 ranks, checkpoint and resume."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf_ds.config import ConfigError, load_config
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.trainer.checkpoint import MARKER, latest_checkpoint
from rlhf_ds.bench import compare_with_floor, format_table, run_bench
from rlhf_ds.trainer.run import run_training

from e2e_common import tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALL_ROLES = ["actor.num_ranks=2", "actor.micro_batch_size=4", "reference.model_path=tiny:llama-micro",
             "algo.kl_placement=loss", "algo.kl_coef=0.05", "reward.use_model=true",
             "reward.model_path=tiny:llama-micro-value", "reward.model_weight=0.1"]
PPO = ["critic.model_path=tiny:llama-micro", "critic.micro_batch_size=4", "critic.lr=1e-3",
       "reference.micro_batch_size=8"]


def _rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run(recipe, output_dir, extra):
    cfg = load_config(recipe, tiny_overrides(output_dir) + ALL_ROLES + extra)
    return cfg, run_training(cfg, log=lambda *_: None, show_progress=False)


def _check_run(cfg, output_dir, trainable):
    rows = _rows(output_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert all(torch.isfinite(torch.tensor(v)) for v in row.values()), row
    for key in ("actor/policy_loss", "actor/kl_loss", "actor/grad_norm", "reward/mean", "reward/model_mean",
                "actor/kl", "timing/rollout_s", "timing/train_s", "timing/sync_s"):
        assert key in rows[1], key
    if "critic" in trainable:
        assert "critic/value_loss" in rows[1] and "critic/grad_norm" in rows[1]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    # parameters changed: the exported final actor differs from the model the run started from
    start = load_file(os.path.join(resolve_model_path("tiny:llama-micro"), "model.safetensors"))
    final = load_file(os.path.join(output_dir, "actor_hf", "model.safetensors"))
    assert start.keys() == final.keys()
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-5
    ckpt = latest_checkpoint(output_dir)
    assert ckpt is not None and ckpt.endswith("step_2") and os.path.exists(os.path.join(ckpt, MARKER))
    for role in trainable:
        assert os.listdir(os.path.join(ckpt, role)), role
    for name in ("summary.json", "curves.png", "config.yaml"):
        assert os.path.exists(os.path.join(output_dir, name)), name
    assert os.listdir(os.path.join(output_dir, "tensorboard"))


def test_grpo_all_roles_then_resume(ray_session, tmp_path):
    out = str(tmp_path / "grpo")
    cfg, summary = _run("grpo_tiny", out, ["cluster.colocate=true"])   # actor, reference, rollout share bundles
    _check_run(cfg, out, ["actor"])
    assert summary["first_eval"]["step"] == 0 and summary["last_eval"]["step"] == 2
    two_step_position = _rows(out)[-1]["data/position"]
    assert two_step_position == 2 * cfg.data.prompts_per_step

    # resume: one more step from the step-2 checkpoint continues at the saved data position
    _, resumed = _run("grpo_tiny", out, ["cluster.colocate=true", "trainer.max_steps=3", "trainer.resume=true"])
    rows = _rows(out)
    assert resumed["resumed_from"].endswith("step_2")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]   # the first run's lines kept, no step repeated
    assert rows[-1]["data/position"] == two_step_position + cfg.data.prompts_per_step
    assert latest_checkpoint(out).endswith("step_3")

    # ... and equals an uninterrupted 3-step run: same rollouts (seeded by step), same update, same weights
    straight = str(tmp_path / "straight")
    _run("grpo_tiny", straight, ["cluster.colocate=true", "trainer.max_steps=3"])
    want = _rows(straight)[-1]
    for key in ("reward/mean", "actor/policy_loss", "actor/kl_loss", "actor/grad_norm", "response/length"):
        assert rows[-1][key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    resumed_actor = load_file(os.path.join(out, "actor_hf", "model.safetensors"))
    straight_actor = load_file(os.path.join(straight, "actor_hf", "model.safetensors"))
    assert max((resumed_actor[k] - straight_actor[k]).abs().max().item() for k in straight_actor) < 1e-6

    # a changed learning rate takes effect on resume (DeepSpeed would restore the saved one); a changed
    # model path is refused before anything starts, listing the key
    _run("grpo_tiny", out, ["cluster.colocate=true", "trainer.max_steps=4", "trainer.resume=true", "actor.lr=5e-4"])
    assert _rows(out)[-1]["step"] == 4 and _rows(out)[-1]["actor/lr"] == pytest.approx(5e-4)
    assert _rows(out)[-2]["actor/lr"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"actor.model_path: 'tiny:llama-micro' -> 'tiny:llama-arith'"):
        _run("grpo_tiny", out, ["cluster.colocate=true", "trainer.max_steps=5", "trainer.resume=true",
                                "actor.model_path=tiny:llama-arith"])


def test_ppo_all_four_roles(ray_session, tmp_path):
    out = str(tmp_path / "ppo")
    cfg, _ = _run("ppo_tiny", out, PPO)
    assert cfg.needs_critic and cfg.needs_reference and cfg.uses_reward_model and cfg.actor.num_ranks == 2
    _check_run(cfg, out, ["actor", "critic"])


def test_engines_inside_the_actor_train_exactly_as_engines_of_their_own(ray_session, tmp_path):
    """rollout.hf_in_actor: engine i inside actor rank i's process, synced by an in-memory copy, draws the
    same samples as engine i in a process of its own (same seed, same rank, same weights), so the two runs
    are the same run: every step's rewards, losses and gradient norm, the held-out accuracy and the final
    weights. A sync that missed a tensor, or an engine serving stale weights, changes step 2 onwards."""
    runs = {}
    for inside in (True, False):
        out = str(tmp_path / f"inside_{inside}")
        cfg = load_config("grpo_tiny", tiny_overrides(out) + [
            "actor.num_ranks=2", "rollout.num_engines=2", f"rollout.hf_in_actor={str(inside).lower()}",
            "trainer.max_steps=3", "trainer.save_interval=0"])
        assert cfg.engines_in_actor == inside
        run_training(cfg, log=lambda *_: None, show_progress=False)
        runs[inside] = (_rows(out), load_file(os.path.join(out, "actor_hf", "model.safetensors")))
    (inside_rows, inside_actor), (own_rows, own_actor) = runs[True], runs[False]
    assert [r["step"] for r in inside_rows] == [0, 1, 2, 3]
    for got, want in zip(inside_rows[1:], own_rows[1:], strict=True):
        for key in ("reward/mean", "response/length", "actor/policy_loss", "actor/grad_norm", "actor/entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-8), (got["step"], key)
    assert inside_rows[-1]["eval/accuracy"] == own_rows[-1]["eval/accuracy"]
    assert max((inside_actor[k] - own_actor[k]).abs().max().item() for k in own_actor) < 1e-6
    assert inside_rows[-1]["timing/sync_s"] > 0


def test_bench_reports_every_figure(ray_session, tmp_path):
    cfg = load_config("grpo_tiny", tiny_overrides(tmp_path / "bench"))
    result = run_bench(cfg, 3, log=lambda *_: None)
    assert result["steps_measured"] == 2            # the first step is a warm-up
    shares = result["stage_share"]
    assert {"rollout", "rewards", "logprobs", "advantages", "train", "sync"} <= set(shares)
    assert 0.5 < sum(shares.values()) <= 1.0 + 1e-3  # stages are parts of the step, nothing counted twice
    assert result["generated_tokens_per_s"] > 0 and result["training_tokens_per_s"] > 0
    assert 0 < result["train_flops_fraction_of_peak"] < 1
    micro = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:llama-micro"))
    assert result["model_params"] == sum(p.numel() for p in micro.parameters())


def test_async_generation_is_one_step_off_policy(ray_session, tmp_path):
    """rollout.async_generation: step 1's batch comes from the initial weights and is trained on them (no
    gap); each later batch was generated before the previous update, so its rollout log-probs differ from
    the actor's recomputed ones, and the truncated importance weights correct for it."""
    cfg = load_config("grpo_tiny", tiny_overrides(tmp_path) + [
        "rollout.async_generation=true", "algo.tis=true", "trainer.max_steps=3", "trainer.eval_interval=2"])
    assert not cfg.on_policy_update   # old log-probs are recomputed
    run_training(cfg, log=lambda *_: None, show_progress=False)
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert rows[1]["rollout/logprob_diff_max"] < 1e-4
    assert rows[2]["rollout/logprob_diff_mean"] > 1e-4 and rows[3]["rollout/logprob_diff_mean"] > 1e-4
    assert "eval/accuracy" in rows[2] and "eval/accuracy" in rows[3]


def test_bench_against_the_floor_reports_both_sides(ray_session, tmp_path):
    result = compare_with_floor("tiny", "hf", rounds=2, steps=1, output_dir=str(tmp_path), log=lambda *_: None,
                                overrides=("actor.model_path=tiny:llama-micro",), peak=1e11)
    assert result["rounds"] == 2 and result["ours_step_s"] > 0 and result["floor_step_s"] > 0
    low, high = result["ratio_spread"]
    assert 0 < low <= result["ratio"] <= high   # the median of the per-round ratios
    assert result["ours_rollout_tokens_per_s"] > 0 and result["floor_generate_tokens_per_s"] > 0
    assert 0 < result["ours_train_fraction_of_peak"] < 1 and 0 < result["floor_train_fraction_of_peak"] < 1
    assert {"rollout", "train", "sync"} <= set(result["stage_share"])
    assert "tiny   hf" in format_table([result])


def test_bench_with_asynchronous_generation_reports_no_rollout_rate(ray_session, tmp_path):
    """Generation overlaps training: the step time is what counts, timing/rollout_s is only the wait for
    the batch, so no rollout rate is derived from it; the batch started ahead is waited for at the end of
    each round, before the floor's steps are timed."""
    result = compare_with_floor("tiny", "hf", rounds=2, steps=2, output_dir=str(tmp_path), log=lambda *_: None,
                                overrides=("actor.model_path=tiny:llama-micro", "rollout.async_generation=true"),
                                peak=1e11)
    assert result["backend"] == "hf+async" and result["ours_rollout_tokens_per_s"] is None
    assert result["ours_step_s"] > 0 and result["floor_generate_tokens_per_s"] > 0
    assert "tiny   hf+async" in format_table([result]) and "overlap" in format_table([result])
