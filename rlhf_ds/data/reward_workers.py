"""Worker processes of the RewardRunner: one fresh interpreter per worker, one call at a time.

The parent talks to each worker over a socket pair with ``multiprocessing.connection`` messages:
parent -> worker ``(function or spec, (prompts, responses, answers, finished))`` or ``None`` (exit);
worker -> parent ``("ready",)`` once, then one outcome per call: ``("ok", floats)``, ``("raised", tb)``,
``("bad_return", why)`` or ``("load_error", tb)``. A worker whose call hangs is killed by the parent;
a worker whose parent dies exits by itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


def _call_reward(fn_or_spec, cache: dict, args: tuple) -> tuple:
    """Run one call inside a worker; the outcome tuple tells the parent what happened."""
    from rlhf_ds.data.rewards import load_reward_function  # here: rewards imports this module

    try:
        if isinstance(fn_or_spec, str):
            if fn_or_spec not in cache:
                cache[fn_or_spec] = load_reward_function(fn_or_spec)
            fn = cache[fn_or_spec]
        else:
            fn = fn_or_spec
    except BaseException:
        return ("load_error", traceback.format_exc(limit=-3))
    try:
        raw = fn(*args)
    except BaseException:  # SystemExit from user code is a failure too, not a dead worker
        return ("raised", traceback.format_exc(limit=-3))
    try:
        if isinstance(raw, (str, bytes)):
            raise TypeError("a string is not a list of scores")
        values = list(raw)
        if any(isinstance(v, (str, bytes)) for v in values):
            raise TypeError("strings are not scores")
        return ("ok", [float(v) for v in values])
    except Exception as err:
        return ("bad_return", f"returned {type(raw).__name__} that is not a sequence of numbers ({err})")


def _worker_main(conn) -> None:
    """Worker process loop: announce readiness, then answer one call at a time until told to stop."""
    conn.send(("ready",))
    cache: dict = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn_or_spec, args = message
        conn.send(_call_reward(fn_or_spec, cache, args))


def _exit_when_orphaned(parent_pid: int) -> None:
    """Watchdog thread of a worker: a call stuck in user code must not outlive the parent."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def worker_entry(fd: int) -> None:
    """Entry point of a worker process, given the file descriptor of its socket to the parent."""
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    _worker_main(Connection(fd))


# A fresh interpreter that imports only rlhf_ds.data. multiprocessing's spawn would also re-run the
# parent's __main__ (a training script importing torch, deepspeed, ray...) in every worker, and fail
# outright for a script without an ``if __name__ == "__main__"`` guard.
_BOOTSTRAP = ("import sys; from rlhf_ds.data.reward_workers import worker_entry; "
              "worker_entry(int(sys.argv[1]))")


class WorkerProcess:
    """One worker process and the parent's end of the socket to it."""

    def __init__(self, start_timeout_s: float):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.setdefault("OMP_NUM_THREADS", "1")  # reward code shares the machine with training
        with child_sock:
            self.process = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno())],
                                            pass_fds=(child_sock.fileno(),), env=env)
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        self.task: int | None = None  # index of the call in flight
        self.deadline = time.monotonic() + start_timeout_s  # start-up deadline until ready

    @property
    def waiting(self) -> bool:
        return not self.ready or self.task is not None

    def send(self, task: int, payload, timeout_s: float) -> None:
        self.conn.send(payload)
        self.task, self.deadline = task, time.monotonic() + timeout_s

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.conn.close()


def stop_workers(workers: list[WorkerProcess]) -> None:
    """Ask idle workers to exit, kill the rest; empties ``workers`` in place."""
    stopping = list(workers)
    workers.clear()
    for w in stopping:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in stopping:
        try:
            w.process.wait(timeout=0.5 if w.task is None else 0.001)
        except subprocess.TimeoutExpired:
            pass
        w.kill()
