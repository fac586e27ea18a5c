"""What every sandboxed process of the reward package shares: a minimal environment (no secrets of the
trainer's) and the kill of a whole process group (nothing a reward function spawned survives it)."""
from __future__ import annotations

import os
import signal
import subprocess

_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


def minimal_env(**overrides: str) -> dict[str, str]:
    """The environment of a sandboxed process: the few variables programs need to run, no secrets."""
    env = {name: os.environ[name] for name in _PASSED_ENV if name in os.environ}
    env["OMP_NUM_THREADS"] = "1"  # reward code shares the machine with training
    env.update(overrides)
    return env


def kill_process_group(process: subprocess.Popen) -> None:
    """SIGKILL everything in the process group that ``process`` leads (``start_new_session``); reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is empty: the leader was reaped and left no children
        pass
    process.wait(timeout=10)
