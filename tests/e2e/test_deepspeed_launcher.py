"""The same trainer under the deepspeed launcher (SPMD, local role groups): 2 ranks, 2 steps."""
import json
import os
import subprocess
import sys

import pytest

from e2e_common import tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_grpo_two_ranks_under_the_deepspeed_launcher(tmp_path):
    out = tmp_path / "run"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", "29517", "--module", "rlhf_ds.cli",
           "train", "grpo_tiny", "cluster.launcher=deepspeed", "actor.num_ranks=2",
           *tiny_overrides(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]            # written once (rank 0), not per rank
    assert rows[1]["actor/grad_norm"] > 0 and rows[2]["data/position"] == 16
    assert (out / "checkpoints" / "step_2" / "COMPLETE").exists()
    assert proc.stdout.count("held-out accuracy") == 1
