"""A run scored over HTTP by `rlhf-ds serve-reward exact_match` (a subprocess on a free port of 127.0.0.1):
the same rewards, step for step, as the same rule run locally; a server killed mid-run stops the run, after
its retries, naming the URL and the last error; a server down at start stops it before any engine starts.

The data asks for an empty answer, so that exact_match pays when a response is eos at once: an untrained
micro model earns that now and then, and the comparison is of rewards that vary, not of zeros."""
import json
import os
import signal
import time

import pytest
from reward_server import ServeReward, free_port

from rlhf_ds.config import load_config
from rlhf_ds.rewards import RewardFunctionError

from e2e_common import tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# each step's metrics the reward decides (through the advantages, the loss and the update too)
SAME = ("reward/mean", "reward/std", "reward/rules_mean", "reward/failures", "reward/timeouts", "eval/accuracy",
        "eval/reward_mean", "eval/finished", "response/length", "response/finished", "actor/policy_loss",
        "actor/grad_norm")


def _data(tmp_path) -> list[str]:
    """Train and held-out prompts whose answer is '' (exact_match: a response that is eos alone)."""
    paths = []
    for split, count in (("train", 64), ("eval", 16)):
        path = tmp_path / f"{split}.jsonl"
        with open(path, "w") as f:
            for k in range(count):
                f.write(json.dumps({"prompt": f"{100 + 7 * k}*{k % 9 + 1}=", "answer": ""}) + "\n")
        paths.append(str(path))
    return [f"data.train_path={paths[0]}", f"data.eval_path={paths[1]}"]


def _config(tmp_path, name: str, *extra: str):
    out = str(tmp_path / name)
    return load_config("grpo_tiny", tiny_overrides(out) + _data(tmp_path) + [
        "trainer.max_steps=3", "trainer.save_interval=0", "reward.max_failure_fraction=0", *extra])


def _rows(cfg) -> list[dict]:
    with open(os.path.join(cfg.trainer.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _remote(url: str) -> list[str]:
    return ["reward.functions=[]", f"reward.remote.url={url}", "reward.remote.batch_size=8",
            "reward.remote.concurrency=2", "reward.remote.timeout_s=20", "reward.remote.retries=2",
            "reward.remote.backoff_s=0.2"]


def test_a_run_scored_by_the_server_gets_the_local_rewards_step_for_step(ray_session, tmp_path):
    from rlhf_ds.trainer.run import run_training

    local = _config(tmp_path, "local", "reward.functions=[exact_match]")
    run_training(local, log=lambda *_: None, show_progress=False)
    server = ServeReward("exact_match")
    try:
        remote = _config(tmp_path, "remote", *_remote(server.url))
        run_training(remote, log=lambda *_: None, show_progress=False)
    finally:
        server.stop()
    local_rows, remote_rows = _rows(local), _rows(remote)
    assert [r["step"] for r in remote_rows] == [r["step"] for r in local_rows] == [0, 1, 2, 3]
    for mine, theirs in zip(remote_rows, local_rows, strict=True):
        for key in [k for k in SAME if k in theirs]:
            assert mine[key] == theirs[key], (mine["step"], key)
        if mine["step"]:
            assert mine["reward/remote_mean"] == theirs["reward/exact_match/mean"]
            assert mine["reward/remote_failures"] == mine["reward/remote_timeouts"] == 0
            assert mine["reward/remote_latency_s"] > 0
    # the rewards vary: a server answering constants would not match
    assert any(r["reward/std"] > 0 for r in local_rows[1:])


def test_a_server_killed_mid_run_stops_the_run_naming_the_url_and_the_last_error(ray_session, tmp_path):
    from rlhf_ds.trainer.run import build_trainer

    server = ServeReward("exact_match")
    cfg = _config(tmp_path, "killed", *_remote(server.url), "reward.max_failure_fraction=0.5")
    trainer, runner = build_trainer(cfg, show_progress=False)
    try:
        step_1 = trainer.train_step(1)
        assert step_1["reward/remote_failures"] == 0
        server.stop(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RewardFunctionError) as err:
            trainer.train_step(2)
        # 2 retries after 0.2 and 0.4 s: the step stops in seconds, not at a deadline
        assert time.monotonic() - started < 60
    finally:
        runner.close()
        trainer.roles.shutdown()
    message = str(err.value)
    assert f"reward.remote.url={server.url}" in message and "32 of 32 samples (100%)" in message
    assert "last error (failed, tries: 3): connection error" in message


def test_a_server_down_at_start_stops_the_run_before_any_engine_starts(tmp_path, monkeypatch):
    from rlhf_ds.trainer import run

    def no_engines(*args, **kwargs):
        raise AssertionError("the roles were started before the remote reward was checked")

    monkeypatch.setattr(run, "build_roles", no_engines)
    url = f"http://127.0.0.1:{free_port()}/score"   # nobody listens there
    cfg = _config(tmp_path, "down", *_remote(url))
    started = time.monotonic()
    with pytest.raises(RewardFunctionError, match=rf"reward.remote.url={url}: the start-up probe .*connection error"):
        run.run_training(cfg, log=lambda *_: None, show_progress=False)
    assert time.monotonic() - started < 60
