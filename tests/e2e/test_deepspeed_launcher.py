"""The same trainer under the deepspeed launcher (SPMD, local role groups): 2 ranks of every role."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_ds.config import load_config
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.trainer.run import run_training

from e2e_common import tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _launch(recipe: str, args: list[str], port: int) -> subprocess.CompletedProcess:
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(port), "--module", "rlhf_ds.cli",
           "train", recipe, "cluster.launcher=deepspeed", *args, "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_grpo_two_ranks_under_the_deepspeed_launcher(tmp_path):
    out = tmp_path / "run"
    proc = _launch("grpo_tiny", ["actor.num_ranks=2", *tiny_overrides(out)], 29517)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2]            # written once (rank 0), not per rank
    assert rows[1]["actor/grad_norm"] > 0 and rows[2]["data/position"] == 16
    assert (out / "checkpoints" / "step_2" / "COMPLETE").exists()
    assert proc.stdout.count("held-out accuracy") == 1


def _reward_model_with_a_head(directory) -> str:
    """The micro value model with a random scoring head (the built one starts at zero and would score
    every response 0, which would hide a reward that differs between the two launchers)."""
    source = resolve_model_path("tiny:llama-micro-value")
    shutil.copytree(source, directory)
    weights = load_file(os.path.join(directory, "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    weights["value_head.weight"] = torch.randn(weights["value_head.weight"].shape, generator=generator)
    save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def test_ppo_every_role_on_two_ranks_matches_the_ray_run(tmp_path):
    """PPO with critic, reference and reward model, each on 2 ranks, under the deepspeed launcher (2
    processes, every process one rank of every role) and under Ray (2 workers per role, 2 rollout
    engines): the same first step, so the same rollouts, rewards and gradient norms."""
    reward_model = _reward_model_with_a_head(tmp_path / "reward_model")
    common = ["trainer.max_steps=1", "actor.num_ranks=2", "critic.num_ranks=2", "reference.num_ranks=2",
              "reward.num_ranks=2", "rollout.num_engines=2", "critic.model_path=tiny:llama-micro",
              "reference.model_path=tiny:llama-micro", "critic.micro_batch_size=4", "critic.lr=1e-3",
              "reference.micro_batch_size=8", "reward.micro_batch_size=8", "algo.kl_placement=loss",
              "algo.kl_coef=0.05", "reward.use_model=true", f"reward.model_path={reward_model}",
              "reward.model_weight=0.5"]
    launched, ray_out = tmp_path / "launcher", str(tmp_path / "ray")
    _launch("ppo_tiny", tiny_overrides(launched) + common, 29518)
    cfg = load_config("ppo_tiny", tiny_overrides(ray_out) + common)
    assert cfg.needs_critic and cfg.needs_reference and cfg.uses_reward_model
    run_training(cfg, log=lambda *_: None, show_progress=False)
    spmd, ray_run = _rows(launched)[1], _rows(ray_out)[1]
    assert spmd["reward/model_mean"] != 0.0 and spmd["actor/grad_norm"] > 0 and spmd["critic/grad_norm"] > 0
    for key in ("reward/mean", "reward/rules_mean", "reward/model_mean", "response/length"):
        assert spmd[key] == pytest.approx(ray_run[key], rel=1e-6, abs=1e-7), key
    for key in ("actor/grad_norm", "critic/grad_norm", "actor/kl_loss", "actor/policy_loss", "critic/value_loss"):
        assert spmd[key] == pytest.approx(ray_run[key], rel=1e-5, abs=1e-7), key
