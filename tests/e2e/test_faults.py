"""Faults a long run meets: a killed actor rank, a stopped rollout engine, SIGTERM, and SIGKILL of the whole
run at random moments followed by resume. Each failure is timed and must name its role and rank; after
each, no process of the run is left."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from rlhf_ds.config import load_config

from e2e_common import tiny_overrides

# One xdist worker runs these one after another: their deadlines are timed, and the fault loop (most of
# its time is process start-up and waiting) overlaps the rest of the suite on the other worker.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("faults")]

KILLS = 10


def _processes(marker: str) -> list[str]:
    """Command lines of live processes containing ``marker``."""
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and not line.startswith("Z")]


def _session(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "sid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(sid) and line.split()[1][0] != "Z"]


def _running(pids: list[int]) -> list[str]:
    """Those of ``pids`` still running (a zombie has ended), as 'pid state command' lines: the processes of
    one run, whatever other runs share the machine."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-p", ",".join(map(str, pids))], capture_output=True,
                         text=True).stdout
    return [line.strip() for line in out.splitlines() if line.split()[1][0] != "Z"]


def _wait_gone(check, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := check()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# ----------------------------------------------------------------------------- in-process faults

def _trainer(tmp_path, *extra):
    from rlhf_ds.trainer.run import build_trainer

    # engines as Ray actors of their own: a fault of an engine process and of an actor rank are apart
    cfg = load_config("grpo_tiny", tiny_overrides(tmp_path) + ["actor.num_ranks=2", "rollout.hf_in_actor=false",
                                                               *extra])
    return build_trainer(cfg, show_progress=False)


def _pids(group) -> list[int]:
    return group.apply_all(lambda _worker, _rank: os.getpid())


def test_a_killed_actor_rank_fails_the_step_within_seconds_naming_it(ray_session, tmp_path):
    from rlhf_ds.cluster.ray_group import WorkerFailure

    trainer, runner = _trainer(tmp_path)
    workers = _pids(trainer.roles.actor) + _pids(trainer.roles.rollout)
    try:
        trainer.train_step(1)
        os.kill(workers[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"role 'actor' rank 1 failed: the worker process died"):
            trainer.train_step(2)
        assert time.monotonic() - started < 15
    finally:
        runner.close()
        trainer.roles.shutdown()
    assert not _wait_gone(lambda: _running(workers), 20)


def test_a_stopped_rollout_engine_fails_the_step_at_the_deadline(ray_session, tmp_path):
    from rlhf_ds.cluster.ray_group import WorkerTimeout

    # the deadline covers every call, the engines' build included: long enough for that on 2 busy cores
    trainer, runner = _trainer(tmp_path, "cluster.call_timeout_s=30")
    workers = _pids(trainer.roles.actor) + _pids(trainer.roles.rollout)
    engine = workers[-1]
    try:
        trainer.train_step(1)
        os.kill(engine, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerTimeout, match=r"role 'rollout' rank\(s\) \[0\] did not answer within "
                                                r"cluster.call_timeout_s=30 s"):
            trainer.train_step(2)
        assert 30 <= time.monotonic() - started < 40
    finally:
        runner.close()
        trainer.roles.shutdown()          # a stopped process is killed all the same
    assert not _wait_gone(lambda: _running(workers), 20)


# ----------------------------------------------------------------------------- whole runs as a user starts them

def _start(out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlhf_ds.cli", "train", "grpo_tiny", *tiny_overrides(out), "--no-progress", *extra]
    log = open(os.path.join(os.path.dirname(out), f"{os.path.basename(out)}.log"), "a")
    return subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _steps_logged(out) -> int:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


def _saving(out) -> bool:
    root = os.path.join(out, "checkpoints")
    return os.path.isdir(root) and any(name.endswith(".partial") for name in os.listdir(root))


def _finish(proc: subprocess.Popen, timeout_s: float = 300) -> int:
    code = proc.wait(timeout=timeout_s)
    left = _wait_gone(lambda: _session(proc.pid), 30)
    assert not left, f"processes of the run left after it ended: {left}"
    return code


def test_sigterm_stops_at_the_next_step_with_a_checkpoint_and_nothing_left(tmp_path):
    out = str(tmp_path / "run")
    proc = _start(out, "trainer.max_steps=200")
    deadline = time.monotonic() + 240
    while _steps_logged(out) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert _finish(proc, 120) == 0
    assert time.monotonic() - started < 60
    summary = json.load(open(os.path.join(out, "summary.json")))
    stopped = summary["stopped_at_step"]
    assert 2 <= stopped < 200
    assert os.path.exists(os.path.join(out, "checkpoints", f"step_{stopped}", "COMPLETE"))


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL of the driver at random moments: while it rolls out, trains or saves (every other kill
    waits for a save in progress). Each restart resumes; the last one finishes. The exported weights
    equal an uninterrupted run's, bit for bit, and no process of any attempt is left (what Ray started
    for a killed driver is stopped by its reaper)."""
    steps = ["trainer.max_steps=40", "trainer.save_interval=1", "trainer.keep_checkpoints=2"]
    straight = str(tmp_path / "straight")
    assert _finish(_start(straight, *steps)) == 0

    out, rng = str(tmp_path / "killed"), random.Random(7)
    kills = []
    while len(kills) < KILLS:
        proc = _start(out, *steps, "trainer.resume=true")
        at_start = _steps_logged(out)
        deadline = time.monotonic() + 240
        in_save = len(kills) % 2 == 1
        while proc.poll() is None and time.monotonic() < deadline:
            if _steps_logged(out) > at_start and (not in_save or _saving(out)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before kill {len(kills) + 1}; see {out}.log"
        if not in_save:
            time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        kills.append((_steps_logged(out), "save" if in_save else "random"))
        proc.wait()
        # a killed driver cannot clean up: what was started for it must go away without it
        left = _wait_gone(lambda pid=proc.pid: _session(pid) + _processes(f"watch({pid})"), 30)
        assert not left, f"after kill {len(kills)} ({kills[-1]}) these processes were left: {left}"
    assert _finish(_start(out, *steps, "trainer.resume=true")) == 0
    got = load_file(os.path.join(out, "actor_hf", "model.safetensors"))
    want = load_file(os.path.join(straight, "actor_hf", "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(got[k].equal(want[k]) for k in want), f"weights differ after kills at {kills}"
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == list(range(41))
