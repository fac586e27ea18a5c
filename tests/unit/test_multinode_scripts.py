"""scripts/ray_cluster.sh and scripts/hostfile.example, without starting Ray.

The script's commands are checked with --dry-run (it prints each command, shell-quoted, instead of
running it). A live `head` is not started here: `ray stop`, the only way to stop it, stops every Ray
process of the machine, and a running head becomes the cluster that a plain `ray.init()` of any other
process on the machine joins; both would break other test runs sharing it.
"""
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "ray_cluster.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The script with ``env`` and none of the variables it reads or forwards from the caller's."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("RAY_", "NCCL_", "GLOO_", "WANDB_", "HF_", "RLHF_DS_"))
             and k not in ("OMP_NUM_THREADS", "DS_ACCELERATOR", "VENV")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


def printed_commands(out: str) -> list[list[str]]:
    """The commands a --dry-run printed ('+ cmd args...' lines), split back into arguments."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def test_help_and_usage_errors():
    shown = run_script("--help")
    assert shown.returncode == 0
    for command in ("head", "worker HEAD_IP:PORT", "run CONFIG", "submit CONFIG", "status", "stop"):
        assert command in shown.stdout
    assert "set -euo pipefail" in SCRIPT.read_text()
    nothing = run_script()
    assert nothing.returncode == 2 and "usage:" in nothing.stderr
    unknown = run_script("--dry-run", "hed")
    assert unknown.returncode == 2 and "unknown command 'hed'" in unknown.stderr
    no_address = run_script("--dry-run", "worker")
    assert no_address.returncode == 2 and "HEAD_IP:PORT" in no_address.stderr


def test_head_prints_the_join_command_and_worker_joins_it():
    head = run_script("--dry-run", "head", "--num-gpus", "8", RAY_NODE_IP="10.1.2.3", RAY_PORT="6390")
    assert head.returncode == 0, head.stderr
    [start] = printed_commands(head.stdout)
    assert start[0].endswith("/ray") and start[1:5] == ["start", "--head", "--port", "6390"]
    assert start[start.index("--node-ip-address") + 1] == "10.1.2.3"
    assert start[start.index("--dashboard-host") + 1] == "127.0.0.1"   # not exposed unless asked
    assert start[-2:] == ["--num-gpus", "8"]
    assert "scripts/ray_cluster.sh worker 10.1.2.3:6390" in head.stdout

    worker = run_script("--dry-run", "worker", "10.1.2.3:6390", "--num-gpus", "8")
    [join] = printed_commands(worker.stdout)
    assert join[1:] == ["start", "--address", "10.1.2.3:6390", "--num-gpus", "8"]


def test_run_starts_the_driver_here_with_the_cluster_address():
    out = run_script("--dry-run", "run", "grpo_tiny", "trainer.max_steps=2", RAY_ADDRESS="10.1.2.3:6390")
    [command] = printed_commands(out.stdout)
    assert command[:2] == ["env", "RAY_ADDRESS=10.1.2.3:6390"]
    assert command[2].endswith("/rlhf-ds") and command[3:] == ["train", "grpo_tiny", "trainer.max_steps=2"]


def test_submit_uploads_the_repo_and_forwards_the_environment():
    out = run_script("--dry-run", "submit", "grpo_tiny", "trainer.output_dir=/shared/runs/a",
                     "reward.functions=[exact_match, format]", NCCL_SOCKET_IFNAME="eth1",
                     RLHF_DS_CACHE="/shared/cache", WANDB_API_KEY="secret")
    assert out.returncode == 0, out.stderr
    [command] = printed_commands(out.stdout)
    assert command[1:3] == ["job", "submit"]
    assert command[command.index("--address") + 1] == "http://127.0.0.1:8265"
    assert command[command.index("--working-dir") + 1] == str(REPO)
    runtime_env = json.loads(command[command.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"] == {"NCCL_SOCKET_IFNAME": "eth1", "RLHF_DS_CACHE": "/shared/cache"}
    assert {".venv", ".cache", ".git"} <= set(runtime_env["excludes"])
    entry = command[command.index("--") + 1:]
    assert entry[1:] == ["-m", "rlhf_ds.cli", "train", "grpo_tiny", "trainer.output_dir=/shared/runs/a",
                         "reward.functions=[exact_match, format]"]
    assert "secret" not in out.stdout


@pytest.mark.parametrize("overrides, error", [
    ((), "trainer.output_dir is 'outputs/grpo_tiny', a relative path"),
    (("trainer.output_dir=/shared/a", "algo.loss_reduction=bogus"), "algo.loss_reduction: invalid value 'bogus'"),
])
def test_submit_refuses_what_would_fail_on_the_cluster(overrides, error):
    out = run_script("--dry-run", "submit", "grpo_tiny", *overrides)
    assert out.returncode != 0 and error in out.stderr
    assert not printed_commands(out.stdout)


def test_hostfile_example_parses_with_deepspeeds_parser():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(REPO / "scripts" / "hostfile.example"))
    assert len(hosts) == 2 and sum(hosts.values()) == 16   # the world size its comment names
