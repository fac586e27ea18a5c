"""Run checkpoints without engines: atomic publish, fault injection, retention, trainer state as JSON, a
torn metrics line, and what a resumed run may change."""
import json
import os
import random
import re

import numpy as np
import pytest
import torch

from rlhf_ds.config import ConfigError, load_config
from rlhf_ds.trainer import checkpoint
from rlhf_ds.trainer.checkpoint import (MARKER, complete_steps, latest_checkpoint, partial_dir,
                                        read_trainer_state, retire_checkpoints, save_run_checkpoint, step_dir)
from rlhf_ds.trainer.logging import read_metrics
from rlhf_ds.trainer.resume import check_resume


class _Done:
    def __init__(self, value=None):
        self.value = value

    def get(self):
        return self.value


class FakeGroup:
    """Writes a shard file where a role's DeepSpeed checkpoint would go; can fail half way."""

    def __init__(self, fail_at_step=None):
        self.fail_at_step = fail_at_step

    def run_all_async(self, method, directory, client_state):
        assert method == "save_checkpoint"
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "shard_0.pt"), "w") as f:
            f.write("half")
        if client_state["step"] == self.fail_at_step:
            raise OSError("disk full half way through the save")
        with open(os.path.join(directory, "shard_0.pt"), "a") as f:
            f.write(" and whole")
        return _Done()


def _save(out, step, group, keep=0):
    state = {"step": step, "loader": {"epoch": 0, "position": step}, "kl": {"kind": "fixed", "value": 0.0}}
    return save_run_checkpoint(out, step, {"actor": group}, state, "seed: 0\n", keep=keep)


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint_as_the_resume_point(tmp_path):
    out = str(tmp_path)
    _save(out, 1, FakeGroup())
    with pytest.raises(OSError, match="half way"):
        _save(out, 2, FakeGroup(fail_at_step=2))
    assert latest_checkpoint(out) == step_dir(out, 1)            # step 2 never became visible
    assert not os.path.exists(step_dir(out, 2)) and os.path.exists(partial_dir(out, 2))
    published = _save(out, 2, FakeGroup())                      # the retry clears the partial directory
    assert published == latest_checkpoint(out) == step_dir(out, 2)
    assert not os.path.exists(partial_dir(out, 2))
    with open(os.path.join(published, "actor", "shard_0.pt")) as f:
        assert f.read() == "half and whole"
    for name in (MARKER, "trainer_state.json", "config.yaml"):
        assert os.path.exists(os.path.join(published, name))


def test_retention_keeps_the_newest_and_never_zero(tmp_path):
    out = str(tmp_path)
    for step in range(1, 5):
        _save(out, step, FakeGroup(), keep=2)
        assert complete_steps(out) == list(range(max(1, step - 1), step + 1))
    with pytest.raises(OSError):
        _save(out, 5, FakeGroup(fail_at_step=5), keep=1)          # a failed save deletes nothing
    assert complete_steps(out) == [3, 4]
    _save(out, 5, FakeGroup(), keep=1)
    assert complete_steps(out) == [5]
    assert _save(out, 6, FakeGroup(), keep=0) and complete_steps(out) == [5, 6]   # 0 keeps all


def test_runs_moved_aside_are_kept_within_the_limit(tmp_path, monkeypatch):
    out = str(tmp_path)
    stamps = iter(["20260101-000001", "20260101-000002", "20260101-000003"])
    monkeypatch.setattr(checkpoint.time, "strftime", lambda _fmt: next(stamps))
    for _ in range(3):
        _save(out, 1, FakeGroup())
        retire_checkpoints(out, keep=2)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoints.before-")) == [
        "checkpoints.before-20260101-000002", "checkpoints.before-20260101-000003"]


def test_trainer_state_is_json_and_restores_every_rng(tmp_path):
    out = str(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    directory = _save(out, 1, FakeGroup())
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    state = read_trainer_state(directory)                       # plain JSON: nothing unpickled
    json.dumps(state)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert state["step"] == 1 and state["loader"] == {"epoch": 0, "position": 1}


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(str(path))


def _checkpointed_config(tmp_path, *overrides):
    cfg = load_config("grpo_tiny", [f"trainer.output_dir={tmp_path}", *overrides])
    save_run_checkpoint(str(tmp_path), 3, {"actor": FakeGroup()}, {"step": 3}, cfg.to_yaml())
    return cfg


def test_resume_refuses_changes_that_alter_the_run_and_lists_them(tmp_path):
    _checkpointed_config(tmp_path)
    changed = load_config("grpo_tiny", [f"trainer.output_dir={tmp_path}", "trainer.resume=true",
                                        "actor.model_path=tiny:llama-micro", "algo.mini_batch_size=128"])
    with pytest.raises(ConfigError, match=r"(?s)actor.model_path: 'tiny:llama-arith' -> 'tiny:llama-micro'"
                                          r".*algo.mini_batch_size: 256 -> 128"):
        check_resume(changed)
    allowed = load_config("grpo_tiny", [f"trainer.output_dir={tmp_path}", "trainer.resume=true",
                                        "algo.mini_batch_size=128",
                                        "trainer.allow_resume_changes=[algo.mini_batch_size]"])
    assert check_resume(allowed, log=lambda _: None) == step_dir(str(tmp_path), 3)


def test_resume_accepts_harmless_changes_and_says_which(tmp_path):
    _checkpointed_config(tmp_path)
    said = []
    cfg = load_config("grpo_tiny", [f"trainer.output_dir={tmp_path}", "trainer.resume=true", "actor.lr=5e-5",
                                    "trainer.max_steps=1000", "actor.micro_batch_size=32"])
    assert check_resume(cfg, log=said.append) == step_dir(str(tmp_path), 3)
    assert "actor.lr: 0.0002 -> 5e-05" in said[0] and "trainer.max_steps: 1500 -> 1000" in said[0]
    assert "actor.micro_batch_size: 128 -> 32" in said[0]


def test_resume_accepts_how_a_remote_reward_is_reached_but_not_where_it_is(tmp_path):
    url = "http://127.0.0.1:8000/score"
    _checkpointed_config(tmp_path, f"reward.remote.url={url}")
    said = []
    cfg = load_config("grpo_tiny", [f"trainer.output_dir={tmp_path}", "trainer.resume=true", f"reward.remote.url={url}",
                                    "reward.remote.timeout_s=5", "reward.remote.token=new", "reward.remote.retries=9"])
    assert check_resume(cfg, log=said.append) == step_dir(str(tmp_path), 3)
    assert "reward.remote.timeout_s: 30.0 -> 5.0" in said[0] and "reward.remote.retries: 3 -> 9" in said[0]
    for changed in ("reward.remote.url=http://127.0.0.1:8001/score", "reward.remote.weight=2"):
        cfg = load_config("grpo_tiny", [f"trainer.output_dir={tmp_path}", "trainer.resume=true",
                                        f"reward.remote.url={url}", changed])
        with pytest.raises(ConfigError, match=re.escape(changed.split("=")[0])):
            check_resume(cfg)


def test_resume_with_other_rank_counts_is_refused_with_what_to_do(tmp_path):
    _checkpointed_config(tmp_path)
    cfg = load_config("grpo_tiny", [f"trainer.output_dir={tmp_path}", "trainer.resume=true", "actor.num_ranks=2"])
    with pytest.raises(ConfigError, match=r"actor.num_ranks: 1 -> 2.*universal checkpoint"):
        check_resume(cfg)


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(tmp_path):
    said = []
    cfg = load_config("grpo_tiny", [f"trainer.output_dir={tmp_path}", "trainer.resume=true"])
    assert check_resume(cfg, log=said.append) is None
    assert "no complete checkpoint" in said[0] and "starting from step 0" in said[0]


def test_a_failure_late_in_start_up_leaves_no_roles_or_reward_workers(monkeypatch):
    """A prompt too long for rollout.max_prompt_len is found after the roles started: they are shut
    down and the reward workers stopped before the error reaches the caller."""
    from rlhf_ds.rewards import RewardRunner
    from rlhf_ds.trainer import run
    from rlhf_ds.trainer.run import build_trainer

    class FakeRoles:
        actor = rollout = critic = reference = reward = None
        is_main, shut = True, False

        def shutdown(self):
            FakeRoles.shut = True

    closed = []
    monkeypatch.setattr(run, "build_roles", lambda cfg, steps: FakeRoles())
    monkeypatch.setattr(RewardRunner, "close", lambda self: closed.append(True))
    cfg = load_config("grpo_tiny", ["rollout.max_prompt_len=3"])
    with pytest.raises(ValueError, match="exceed rollout.max_prompt_len=3"):
        build_trainer(cfg, show_progress=False)
    assert FakeRoles.shut and closed == [True]
